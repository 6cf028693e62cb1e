"""Quality per uplink byte: every codec against the uncompressed baseline, same rounds and seeds.

    python -m bench.quality [--rounds 8] [--seeds 3] [--steps 10] [--agents 4] [--pretrain-steps 0]

A tiny Llama and its tokenizer are built locally (nothing downloaded); four agents hold
non-IID text (weather, cooking, football, and a weather+football mix, of different sizes);
``--agents 3`` leaves the mix out, 5 and 6 add cooking+football and weather+cooking mixes.
The base is random unless ``--pretrain-steps`` first trains it on the public text (other
documents of the same domains, also the eigen bases' calibration text).
Each scheme runs the same FedAvg rounds from the same seeds with the real trainer (LoRA via
peft) and the real codecs; schemes marked ``secagg`` go through the real secure-aggregation
protocol (keys, shares, masks, unmasking) in process. Per scheme and seed: mean held-out eval
loss per round, cumulative uplink bytes (updates plus, with secagg, key traffic), the bytes
needed to reach the baseline's final loss + 0.1, and the cosine between the decoded aggregate
and the true weighted mean of the agents' updates. Results: bench/results/quality.json,
quality.png (eval loss vs cumulative uplink bytes) and quality.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from agent.data import pack, split
from agent.eigen_bases import kept_summary
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer, initial_adapter
from agent.uplink import evaluation_bytes, secagg_key_bytes, upload_bytes, upload_header
from common.codecs import registry
from common.codecs.base import Codec
from common.codecs.countsketch import CountSketch
from common.codecs.eigen import Eigen, calibration_covariances, eigen_bases, stored_bases
from common.codecs.feedback import ErrorFeedback
from common.codecs.quantize import Quantize
from common.layout import ParamLayout
from common.secagg.agent import AgentRound
from common.secagg.clips import SegmentClips
from common.secagg.local import Codes, Federation, run_round
from common.secagg.params import SecAggParams
from common.secagg.ring import FixedPoint
from common.secagg.strata import StratifiedUniforms, stratifies
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus, pretrain_tiny_lm
from server.autoencoder import AutoencoderPlan, AutoencoderSchedule
from server.fetchsgd import FetchSGD, FetchSGDPlan
from server.servicer import codec_spec

RESULTS = Path(__file__).resolve().parent / "results"
LORA = LoraSpec(8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
AGENTS = {"weather": 120, "cooking": 240, "football": 360, "mixed": 180}  # documents per agent
MORE_AGENTS = {"kitchen-sport": 200, "almanac": 150}  # --agents 5, 6: further mixes
MIXES = {
    "mixed": (("weather", 5), ("football", 6)),
    "kitchen-sport": (("cooking", 7), ("football", 8)),
    "almanac": (("weather", 9), ("cooking", 10)),
}


@dataclass(frozen=True)
class Scheme:
    """One way of sending updates."""

    label: str
    codec: str = "identity"
    ratio: float = 1.0
    bits: int = 8
    clip: float = 0.25
    secagg: bool = False
    secagg_bits: int = 20
    """Fixed-point bits under secure aggregation; the ring adds ceil(log2 agents) on the wire."""
    secagg_clip: float = 2.0
    refresh: int = 3
    """autoencoder: every n-th round after TGAP is a full FAF round."""
    adaptive: float = 0.0
    """secagg: clip each segment at this multiple of its RMS in the last aggregate (0: fixed clip)."""
    segment: int = 1024
    """secagg: coordinates per adaptive clip bound."""
    topk: float = 0.1
    """countsketch: FetchSGD's k as a fraction of the sketch's width."""
    codec_segment: int = 0
    """quantize: each agent's own bound per this many values (``clip`` x their RMS); 0: shared clip."""
    fill_ring: bool = True
    """secagg: codes over the whole ring (0 .. (2^m - 1) // n); False: 0 .. 2^bits - 1, as before."""
    secagg_levels: int = 0
    """secagg: code levels when not 2^bits (3: ternary)."""
    pack: bool = True
    """secagg: several codes a ring element (``ring.round_layout``); False: one, as before."""
    stratified: bool = True
    """secagg: dithers from shared strata (``strata``) for codes of up to 8 bits, as the agents do
    (``strata.stratifies``; finer ones round independently). False: independent at any bits."""
    coverage: int = 0
    """secagg: agents that send each element (``secagg.coverage``); 0: all."""
    extra: bool = False
    """Left out of the default run: only when ``--only`` names it."""


TWO_BITS = Scheme(
    "identity + secagg 2 bit adaptive x2", secagg=True, secagg_bits=2, secagg_clip=0.15, adaptive=2.0
)
TERNARY = Scheme(
    "identity + secagg ternary adaptive x2",
    secagg=True,
    secagg_bits=1,
    secagg_levels=3,
    secagg_clip=0.12,
    adaptive=2.0,
)
BINARY = Scheme(
    "identity + secagg 1 bit adaptive x1.25", secagg=True, secagg_bits=1, secagg_clip=0.12, adaptive=1.25
)
COVERED = Scheme(
    "identity + secagg 2 bit adaptive x1.25, 2 agents an element",
    secagg=True,
    secagg_bits=2,
    secagg_clip=0.12,
    adaptive=1.25,
    coverage=2,
)
SCHEMES = (
    Scheme("identity (float32)"),
    Scheme("identity + secagg 20 bit", secagg=True),
    Scheme("identity + secagg 8 bit", secagg=True, secagg_bits=8, secagg_clip=0.5),
    Scheme("identity + secagg 4 bit", secagg=True, secagg_bits=4, secagg_clip=0.5),
    Scheme("identity + secagg 4 bit adaptive", secagg=True, secagg_bits=4, secagg_clip=0.15, adaptive=3.0),
    Scheme("identity + secagg 3 bit adaptive", secagg=True, secagg_bits=3, secagg_clip=0.15, adaptive=3.0),
    TWO_BITS,
    replace(TWO_BITS, label=f"{TWO_BITS.label}, one code an element", pack=False, extra=True),
    TERNARY,
    replace(
        TERNARY,
        label="identity + secagg ternary adaptive x1.5, independent rounding",
        adaptive=1.5,
        stratified=False,
        extra=True,
    ),
    BINARY,
    replace(BINARY, label=f"{BINARY.label}, independent rounding", stratified=False),
    replace(TWO_BITS, label=f"{TWO_BITS.label}, codes 0..3", fill_ring=False, extra=True),
    COVERED,
    replace(
        COVERED,
        label="identity + secagg 5 levels adaptive x1.5, 2 agents an element",
        secagg_levels=5,
        adaptive=1.5,
    ),
    replace(BINARY, label=f"{BINARY.label}, 2 agents an element", coverage=2, extra=True),
    Scheme(
        "identity + secagg ternary adaptive x2, 3 agents an element",
        secagg=True,
        secagg_bits=1,
        secagg_levels=3,
        secagg_clip=0.12,
        adaptive=2.0,
        coverage=3,
    ),
    Scheme("quantize 8 bit", "quantize", bits=8),
    Scheme("quantize 2 bit", "quantize", bits=2),
    Scheme("quantize 4 bit per-1024 x3", "quantize", bits=4, clip=3.0, codec_segment=1024),
    Scheme("quantize 3 bit per-1024 x3", "quantize", bits=3, clip=3.0, codec_segment=1024),
    Scheme("quantize 2 bit per-1024 x1.5", "quantize", bits=2, clip=1.5, codec_segment=1024),
    Scheme("topk 16x + EF", "topk", ratio=16),
    Scheme("topk 32x + EF", "topk", ratio=32),
    Scheme("projection 4x + EF + secagg 8 bit", "projection", 4, secagg=True, secagg_bits=8, secagg_clip=0.5),
    Scheme("projection 16x + EF + secagg 20 bit", "projection", ratio=16, secagg=True),
    Scheme(
        "projection 4x + EF + secagg 4 bit adaptive",
        "projection",
        4,
        secagg=True,
        secagg_bits=4,
        secagg_clip=0.15,
        adaptive=3.0,
    ),
    Scheme(
        "projection 2x + EF + secagg 2 bit adaptive x2",
        "projection",
        2,
        secagg=True,
        secagg_bits=2,
        secagg_clip=0.15,
        adaptive=2.0,
    ),
    Scheme("countsketch 4x + FetchSGD", "countsketch", 4),
    Scheme(
        "countsketch 2x + FetchSGD k=0.25 + secagg 8 bit adaptive",
        "countsketch",
        2,
        secagg=True,
        secagg_bits=8,
        secagg_clip=0.5,
        adaptive=3.0,
        topk=0.25,
    ),
    Scheme("eigen 4x + secagg 8 bit", "eigen", ratio=4, secagg=True, secagg_bits=8, secagg_clip=0.5),
    Scheme("eigen 16x + secagg 20 bit", "eigen", ratio=16, secagg=True),
    Scheme("autoencoder 16x (nonlinear decoder)", "autoencoder", ratio=16),
    Scheme(
        "autoencoder 16x linear decoder + secagg 8 bit",
        "autoencoder",
        16,
        secagg=True,
        secagg_bits=8,
        secagg_clip=0.5,
    ),
    Scheme(
        "autoencoder 16x linear + secagg 8 bit, refresh every 8",
        "autoencoder",
        16,
        secagg=True,
        secagg_bits=8,
        secagg_clip=0.5,
        refresh=8,
    ),
    Scheme(
        "autoencoder 16x linear + secagg 4 bit adaptive",
        "autoencoder",
        16,
        secagg=True,
        secagg_bits=4,
        secagg_clip=0.15,
        adaptive=3.0,
    ),
    Scheme(
        "autoencoder 16x linear + secagg 4 bit adaptive, refresh every 8",
        "autoencoder",
        16,
        secagg=True,
        secagg_bits=4,
        secagg_clip=0.15,
        adaptive=3.0,
        refresh=8,
    ),
)


class World:
    """Model, tokenizer and each agent's train/eval blocks, built once."""

    def __init__(
        self,
        root: Path,
        sequence_length: int = 64,
        agents: int = len(AGENTS),
        lora: LoraSpec = LORA,
        pretrain_steps: int = 0,
        pretrain_domains: Sequence[str] = DOMAINS,
    ) -> None:
        """``pretrain_steps``: train the base model's every parameter on the public text of
        ``pretrain_domains`` first (the agents' text is other documents), instead of fine-tuning a
        random base; with fewer than all domains the federation adapts it to new ones."""
        self.root, self.lora = root, lora
        self.agents = dict(list({**AGENTS, **MORE_AGENTS}.items())[:agents])
        public_of = {domain: domain_corpus(domain, 100, seed=99) for domain in DOMAINS}
        public = [doc for docs in public_of.values() for doc in docs]
        model = build_tiny_lm(root / "model", public)
        tokenizer = AutoTokenizer.from_pretrained(model)
        calibration = pack(tokenizer, public, sequence_length)  # public text, known to all
        self.pretrained: tuple[float, float] | None = None
        if pretrain_steps:
            seen_docs = [doc for domain in pretrain_domains for doc in public_of[domain]]
            seen = pack(tokenizer, seen_docs, sequence_length)
            model, before, after = pretrain_tiny_lm(model, seen, pretrain_steps, root / "pretrained")
            self.pretrained = (before, after)
        self.model = str(model)
        self.trainer = LoraTrainer(self.model, lora)
        self.train: dict[str, torch.Tensor] = {}
        self.eval: dict[str, torch.Tensor] = {}
        for i, (name, documents) in enumerate(self.agents.items()):
            if name in MIXES:
                docs = [
                    doc
                    for domain, seed in MIXES[name]
                    for doc in domain_corpus(domain, documents // 2, seed=seed)
                ]
            else:
                docs = domain_corpus(name, documents, seed=1 + i)
            train_docs, eval_docs = split(docs, 0.15)
            self.train[name] = pack(self.trainer.tokenizer, train_docs, sequence_length)
            self.eval[name] = pack(self.trainer.tokenizer, eval_docs, sequence_length)
        self.federation = Federation.create(len(self.agents), trust_domain="bench.cloudfed")
        self.covariances = calibration_covariances(self.trainer.model, calibration)
        self.ids = dict(zip(self.agents, sorted(self.federation.agents), strict=True))
        self._eigen: dict[float, tuple[dict[str, np.ndarray], dict[str, float]]] = {}

    def eigen(self, ratio: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The eigen bases at ``ratio`` as the operator's tool stores them, and the share of its
        covariance's variance each keeps; made once per ratio."""
        if ratio not in self._eigen:
            kept: dict[str, float] = {}
            layout = ParamLayout.from_tensors(initial_adapter(self.model, self.lora, 0))
            bases = stored_bases(eigen_bases(layout, self.covariances, ratio, kept=kept))
            self._eigen[ratio] = (bases, kept)
        return self._eigen[ratio]

    def eval_loss(self, adapter: dict[str, torch.Tensor]) -> float:
        """Mean over agents of the held-out loss."""
        self.trainer.set_adapter(adapter)
        return float(np.mean([self.trainer.evaluate(blocks)[0] for blocks in self.eval.values()]))


def run(world: World, scheme: Scheme, seed: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """One scheme, one seed: eval loss, cumulative uplink bytes and cosine per round."""
    adapter = initial_adapter(world.model, world.lora, seed)
    layout = ParamLayout.from_tensors(adapter)
    numel = layout.numel
    training = LocalTraining(steps, 5e-3, 8, 64, seed)
    settings = registry.CodecSettings(
        scheme.codec, scheme.ratio, scheme.bits, scheme.clip, seed, segment=scheme.codec_segment
    )
    residuals: dict[str, ErrorFeedback] = {}
    learned = (
        Learned(scheme, seed, numel, world.root / f"ae-{scheme.label}-{seed}")
        if scheme.codec == "autoencoder"
        else None
    )
    fetchsgd = None
    if scheme.codec == "countsketch":  # the aggregator's FetchSGD loop over the summed sketches
        sketch = CountSketch(numel, scheme.ratio, seed)
        fetchsgd = FetchSGD(
            sketch,
            round(scheme.topk * sketch.cols),
            FetchSGDPlan().momentum,
            world.root / f"fetchsgd-{scheme.label}-{seed}",
        )
    eigen = (  # fixed bases: made once, not every round
        Eigen(layout, world.eigen(scheme.ratio)[0]) if scheme.codec == "eigen" else None
    )
    losses, sent, cosines = [world.eval_loss(adapter)], [0.0], []
    previous: np.ndarray | None = None  # the last round's aggregate (adaptive clip bounds)
    examples = {name: float(len(blocks)) for name, blocks in world.train.items()}
    for round_id in range(1, rounds + 1):
        deltas = {}
        for name, blocks in world.train.items():
            world.trainer.set_adapter(adapter)
            delta, _ = world.trainer.train(blocks, training, round_id)
            deltas[name] = layout.flatten(delta)
        if learned is not None:
            codec = learned.codec(numel, round_id)
        elif eigen is not None:
            codec = eigen
        else:
            codec = registry.make(settings, numel, round_id)
        if isinstance(codec, Quantize):  # stochastic rounding repeats exactly from run to run
            codec.rng = np.random.default_rng([seed, round_id])
        true_mean = sum(examples[n] * deltas[n].astype(np.float64) for n in deltas) / sum(examples.values())
        coords = {name: _coords(codec, delta, residuals, name) for name, delta in deltas.items()}
        if scheme.secagg:
            mean, payloads, nbytes = _secure_round(world, codec, coords, examples, round_id, scheme, previous)
        else:
            mean, payloads = _plain_round(codec, deltas, coords, examples, summed=fetchsgd is not None)
            nbytes = 0
        spec = codec_spec(learned.settings if learned is not None else settings)  # echoed in the header
        header = upload_header(round_id, spec, layout.digest, round_id - 1, 1.0, b"")
        for size in payloads:  # as the daemon sends a new upload: header, chunks
            header.total_bytes = size  # the digest is 32 bytes whatever the payload
            nbytes += upload_bytes(header)
        kept = mean  # the next round's clip bounds: FetchSGD's mean sketch, else the mean update
        if fetchsgd is not None:
            mean = fetchsgd.step(mean, round_id).astype(np.float64)
        elif codec is not None and scheme.secagg:  # linear: the sum decodes once
            mean = kept = codec.decode(mean.astype(np.float32)).astype(np.float64)
        if learned is not None:  # a full round feeds TGAP / FAF; an encoded one is counted
            learned.learn([mean.astype(np.float32)] if scheme.secagg else list(coords.values()))
        previous = kept.astype(np.float32)
        cosines.append(float(mean @ true_mean / (np.linalg.norm(mean) * np.linalg.norm(true_mean) + 1e-30)))
        flat = layout.flatten(adapter) + mean.astype(np.float32)
        adapter = layout.unflatten(flat)
        losses.append(world.eval_loss(adapter))
        nbytes += sum(evaluation_bytes(round_id, losses[-1], b.numel()) for b in world.eval.values())
        sent.append(sent[-1] + nbytes)
    return {"eval_loss": losses, "uplink_bytes": sent, "cosine": cosines}


class Learned:
    """The aggregator's CG-FedLLM schedule (``server.autoencoder``): 2 full warm-up rounds for TGAP,
    then encoded rounds with a full FAF refresh every 3. Trusted, it learns from each agent's
    update; under secure aggregation only from the round mean (as the daemon does). Full rounds
    count in the uplink."""

    def __init__(self, scheme: Scheme, seed: int, numel: int, root: Path) -> None:
        torch.manual_seed(seed)
        plan = AutoencoderPlan(scheme.ratio, linear=scheme.secagg, refresh=scheme.refresh, seed=seed)
        self.schedule = AutoencoderSchedule(plan, numel, root)
        self.base = registry.CodecSettings("autoencoder", ratio=scheme.ratio)
        self.settings = self.base

    def codec(self, numel: int, round_id: int) -> Codec | None:
        """None in full rounds, else the autoencoder as trained so far."""
        self.settings = self.schedule.settings(self.base)
        return registry.make(self.settings, numel, round_id, self.schedule.codec)

    def learn(self, updates: list[np.ndarray]) -> None:
        """After the round: count it, or learn from its updates (TGAP, then FAF)."""
        self.schedule.observe(self.settings, updates)


def _coords(
    codec: Codec | None, delta: np.ndarray, residuals: dict[str, ErrorFeedback], name: str
) -> np.ndarray:
    """What the agent sends before framing or masking; biased codecs through error feedback."""
    if codec is None:
        return delta
    if not codec.biased:
        return codec.encode(delta)
    feedback = residuals.setdefault(name, ErrorFeedback(codec, delta.size))
    feedback.codec = codec
    return feedback.encode(delta)


def _plain_round(
    codec: Codec | None,
    deltas: dict[str, np.ndarray],
    coords: dict[str, np.ndarray],
    examples: dict[str, float],
    summed: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """The weighted mean of the decoded payloads (``summed``: of the payloads, not decoded), and
    the payloads' sizes."""
    total: np.ndarray | float = 0.0
    weight_sum, sizes = 0.0, []
    for name, delta in deltas.items():
        payload = registry.encode_plain(codec, delta, examples[name], encoded=coords[name])
        sizes.append(len(payload))
        if summed and codec is not None:
            weighted, weight = registry.weighted_payload(codec, payload, delta.size)
        else:
            weighted, weight = registry.decode_plain(codec, payload, delta.size)
        total = total + weighted.astype(np.float64)
        weight_sum += weight
    return np.asarray(total) / weight_sum, sizes


def _secure_round(
    world: World,
    codec: Codec | None,
    coords: dict[str, np.ndarray],
    examples: dict[str, float],
    round_id: int,
    scheme: Scheme,
    previous: np.ndarray | None,
) -> tuple[np.ndarray, list[int], int]:
    """As the daemons do it (``server.rounds``): adaptive bounds from the last aggregate encoded with
    this round's codec, the configured clip in the first round. The mean, the masked payloads'
    sizes and the round's key traffic in bytes."""
    bits, count = scheme.secagg_bits, next(iter(coords.values())).size
    clips = None
    if scheme.adaptive:
        clips = SegmentClips.uniform(count, scheme.segment, scheme.secagg_clip)
        if previous is not None:
            # FetchSGD keeps the sketch: its aggregate is already in the codec's space
            prev = previous if codec is None or codec.name == "countsketch" else codec.encode(previous)
            clips = SegmentClips.from_aggregate(prev, scheme.segment, scheme.adaptive)
    clip = 1.0 if clips is not None else scheme.secagg_clip
    n = len(coords)
    params = SecAggParams.for_round(
        n // 2 + 1, 0, clip, bits, n, scheme.fill_ring, scheme.secagg_levels, scheme.pack, scheme.coverage
    ).check(n)
    fp = params.fixed_point
    scale = max(examples.values())
    weights = {world.ids[name]: examples[name] / scale for name in coords}
    codes: dict[str, Codes] = {}
    seed, roster = b"bench", list(world.ids.values())
    length = fp.masked_length(count)
    for i, (name, c) in enumerate(coords.items()):
        values = c if clips is None else clips.scale_down(c)
        private = np.random.default_rng([round_id, i])
        agent = world.ids[name]
        if scheme.coverage:  # its dithers need the round's senders: encoded once its shares arrived
            codes[agent] = _covered_encoder(fp, values, weights[agent], private, length)
            continue
        rng = (
            StratifiedUniforms.for_agent(seed, round_id, roster, agent, private)
            if scheme.stratified and stratifies(fp.levels)
            else private
        )
        codes[agent] = fp.encode_weighted(values, weights[agent], rng)
    result = run_round(world.federation, codes, params, round_id=round_id, seed=seed, length=length)
    if scheme.coverage:
        assert result.server is not None
        mean32 = result.server.covered_mean(result.total, weights, count)
    else:
        mean32, _ = fp.decode_weighted_mean(result.total, len(codes), count)
    if clips is not None:
        mean32 = clips.scale_up(mean32)
    mean = mean32.astype(np.float64)  # in the codec's coordinates: decoded (once) by the caller
    keys = sum(
        secagg_key_bytes(round_id, sent.advertisement, sent.sealed, sent.reveals, result.roster)
        for sent in result.keys.values()
    )
    return mean, list(result.upload_bytes.values()), keys


def _covered_encoder(
    fp: FixedPoint, values: np.ndarray, weight: float, private: np.random.Generator, length: int
) -> Callable[[AgentRound], np.ndarray]:
    """An agent's encoding with coverage, run once the protocol knows the round's senders."""

    def encode(protocol: AgentRound) -> np.ndarray:
        return fp.encode_weighted(values, weight, protocol.rounding(private, length))

    return encode


def bytes_to_reach(runs: list[dict[str, list[float]]], target: float) -> float | None:
    """The median over seeds of the uplink bytes at the first eval loss within ``target``; None
    unless every seed gets there."""
    reach = [
        next((b for loss, b in zip(r["eval_loss"], r["uplink_bytes"], strict=True) if loss <= target), None)
        for r in runs
    ]
    reached = [b for b in reach if b is not None]
    return statistics.median(reached) if len(reached) == len(reach) else None


def summarise(results: dict[str, list[dict[str, list[float]]]]) -> dict[str, dict[str, float | None]]:
    """Medians over seeds, each seed's gap to the baseline's run from the same seed (median and
    range), and the bytes to reach the baseline's final loss + 0.1."""
    baseline = results[SCHEMES[0].label]
    base_final = statistics.median(r["eval_loss"][-1] for r in baseline)
    target = base_final + 0.1
    base_bytes = statistics.median(r["uplink_bytes"][-1] for r in baseline)
    base_reach = bytes_to_reach(baseline, target)
    out: dict[str, dict[str, float | None]] = {}
    for label, runs in results.items():
        final = statistics.median(r["eval_loss"][-1] for r in runs)
        total = statistics.median(r["uplink_bytes"][-1] for r in runs)
        reach = bytes_to_reach(runs, target)
        paired = [r["eval_loss"][-1] - b["eval_loss"][-1] for r, b in zip(runs, baseline, strict=True)]
        out[label] = {
            "final_eval_loss": final,
            "loss_gap_nats": final - base_final,
            "seed_gap_median": statistics.median(paired),
            "seed_gap_min": min(paired),
            "seed_gap_max": max(paired),
            "uplink_bytes": total,
            "compression": base_bytes / total,
            "bytes_to_target": reach,
            # None where either misses the target, or where it needs no training (a base that good)
            "bytes_saving_to_target": base_reach / reach if reach is not None and base_reach else None,
            "cosine": statistics.median(float(np.mean(r["cosine"])) for r in runs),
        }
    return out


def markdown(
    summary: dict[str, dict[str, float | None]],
    rounds: int,
    seeds: int,
    agents: int = 4,
    rank: int = LORA.rank,
    base: str = "",
) -> str:
    """The README table (``base``: how the base model was pretrained, if it was)."""
    lines = [
        f"| scheme | compression | final eval loss ({rounds} rounds) | gap (nats) | gap seed by seed "
        "(median; range) | uplink bytes to baseline + 0.1 | cosine to true mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in summary.items():
        if s["bytes_to_target"] is None:
            reach = "not reached"
        elif s["bytes_to_target"] == 0:
            reach = "0 MB (the base is within 0.1 already)"
        elif s["bytes_saving_to_target"] is None:
            reach = f"{s['bytes_to_target'] / 1e6:.2f} MB (not every baseline seed reaches it)"
        else:
            reach = f"{s['bytes_to_target'] / 1e6:.2f} MB ({s['bytes_saving_to_target']:.1f}x fewer)"
        seeds_gap = (
            f"{s['seed_gap_median']:+.3f} ({s['seed_gap_min']:+.3f} to {s['seed_gap_max']:+.3f})"
            if s.get("seed_gap_median") is not None
            else "-"
        )
        lines.append(
            f"| {label} | {s['compression']:.1f}x | {s['final_eval_loss']:.3f} | {s['loss_gap_nats']:+.3f} "
            f"| {seeds_gap} | {reach} | {s['cosine']:.3f} |"
        )
    lines.append(
        f"\nMedians over {seeds} seeds; {agents} agents with non-IID text; LoRA rank {rank}"
        f"{'; ' + base if base else ''}; "
        "`python -m bench.quality`."
    )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, list[float]]]], path: Path) -> None:
    """Eval loss against cumulative uplink bytes after each round, one line per scheme (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, runs in results.items():
        loss = np.median([r["eval_loss"] for r in runs], axis=0)
        sent = np.median([r["uplink_bytes"] for r in runs], axis=0)
        ax.plot(sent[1:] / 1e6, loss[1:], marker="o", markersize=3, label=label)  # from the first round
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, all agents)")
    ax.set_ylabel("mean held-out eval loss (nats)")
    ax.set_title("cloudfed codecs: quality per uplink byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def describe_base(steps: int, domains: Sequence[str], losses: Sequence[float] | None) -> str:
    """How the base was pretrained, for the table's caption ('' for a random base)."""
    if not steps or losses is None:
        return ""
    return (
        f"the base pretrained {steps} steps on the {', '.join(domains)} public text"
        f" (its loss {losses[0]:.2f} -> {losses[1]:.2f})"
    )


def save_results(path: Path, saved: dict[str, Any]) -> None:
    """Summarise the runs ``saved`` holds (with the run's settings) into it and write it to
    ``path`` (.json), with its Markdown table (.md) and plot (.png)."""
    saved["summary"] = summary = summarise(saved["runs"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1) + "\n")
    base = describe_base(
        saved.get("pretrain_steps", 0), saved.get("pretrain_domains", []), saved.get("pretrained_loss")
    )
    table = markdown(
        summary,
        saved["rounds"],
        saved["seeds"],
        saved.get("agents", len(AGENTS)),
        saved.get("rank", LORA.rank),
        base,
    )
    path.with_suffix(".md").write_text(table)
    plot(saved["runs"], path.with_suffix(".png"))
    print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--replot",
        action="store_true",
        help="redo the summary, table and plot from the runs saved in <name>.json (runs nothing)",
    )
    p.add_argument(
        "--only",
        help="comma-separated label parts: run only matching schemes (and the baseline when saving)",
    )
    p.add_argument("--name", default="quality", help="results file stem (quality: the README table)")
    p.add_argument("--agents", type=int, default=len(AGENTS), choices=range(3, 7), help="fleet size")
    p.add_argument("--rank", type=int, default=LORA.rank, help="LoRA rank (8: 16,384 adapter parameters)")
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="first train the base model on the public text for this many steps (0: a random base)",
    )
    p.add_argument(
        "--pretrain-domains",
        default=",".join(DOMAINS),
        help="comma-separated domains of the public text the base is pretrained on (the others are new)",
    )
    args = p.parse_args()
    if args.replot:  # the settings and runs as saved, summarised again
        save_results(RESULTS / f"{args.name}.json", json.loads((RESULTS / f"{args.name}.json").read_text()))
        return
    pretrain_domains = [d for d in args.pretrain_domains.split(",") if d]
    if unknown := set(pretrain_domains) - set(DOMAINS):
        p.error(f"unknown --pretrain-domains {sorted(unknown)}: choose from {', '.join(DOMAINS)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        world = World(
            Path(tmp),
            agents=args.agents,
            lora=replace(LORA, rank=args.rank),
            pretrain_steps=args.pretrain_steps,
            pretrain_domains=pretrain_domains,
        )
        if world.pretrained is not None:
            print(describe_base(args.pretrain_steps, pretrain_domains, world.pretrained), flush=True)
        results: dict[str, list[dict[str, list[float]]]] = {}
        kept: dict[str, dict[str, float]] = {}  # eigen schemes: the share of variance each basis keeps
        for scheme in SCHEMES:
            wanted = scheme is SCHEMES[0] and args.name != "quality"
            named = bool(args.only) and any(part in scheme.label for part in args.only.split(","))
            if (args.only and not wanted and not named) or (scheme.extra and not named):
                continue
            if scheme.codec == "eigen":
                kept[scheme.label] = world.eigen(scheme.ratio)[1]
                print(f"{scheme.label}: the bases keep {kept_summary(kept[scheme.label])}", flush=True)
            results[scheme.label] = [
                run(world, scheme, seed, args.rounds, args.steps) for seed in range(args.seeds)
            ]
            final = statistics.median(r["eval_loss"][-1] for r in results[scheme.label])
            print(
                f"{scheme.label:28s} final eval loss {final:.4f}  ({time.monotonic() - began:.0f}s)",
                flush=True,
            )
    if args.only and args.name == "quality":
        return  # a partial run does not replace the README's table
    save_results(
        RESULTS / f"{args.name}.json",
        {
            "rounds": args.rounds,
            "seeds": args.seeds,
            "steps": args.steps,
            "agents": args.agents,
            "rank": args.rank,
            "pretrain_steps": args.pretrain_steps,
            "pretrain_domains": pretrain_domains if args.pretrain_steps else [],
            "pretrained_loss": world.pretrained,
            "summary": {},  # filled in by save_results, kept ahead of the runs
            "eigen_kept": kept,
            "runs": results,
        },
    )
    print(f"saved {RESULTS}/{args.name}.{{json,md,png}} in {time.monotonic() - began:.0f}s")


if __name__ == "__main__":
    main()
