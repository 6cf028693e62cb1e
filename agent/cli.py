"""cloudfed-agent: the agent's command line.

``check`` is a preflight an operator runs in each cloud: it validates the
config, connects to the aggregator with the agent's certificate, joins, prints
what the aggregator sees and the federation's settings, and downloads and
verifies the latest global adapter. ``run`` is the daemon: it trains the shared
LoRA adapter on local data every round and uploads the update.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from agent.distributed import DistContext
from common import sdnotify
from common.config import AgentConfig, load
from common.cpu_threads import process_plan, set_torch_threads
from common.errors import CloudfedError
from common.logs import setup_logging

if TYPE_CHECKING:
    from agent.token_store import Corpus, TokenStore
    from protos.cloudfed.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)


async def check(config: AgentConfig, tokenize: bool = False, ranks: int = 1) -> int:
    """Join and download the latest version; print what was learned. With ``tokenize``, also
    tokenize the data into the token store as ``run`` would (the federation's model and sequence
    length), so that the daemon's first start trains at once. ``ranks``: the torchrun ranks
    ``run`` will train on (their batches add up in the DP plan)."""
    from agent.client import AggregatorClient
    from agent.dp_budget import describe as describe_dp
    from agent.dp_budget import eval_preview, preview
    from agent.privacy import announced, check_federation, describe
    from agent.revocations import AgentRevocations, describe_revocations
    from agent.token_store import TokenStore
    from common.metrics import publish_validity

    async with AggregatorClient(
        config.aggregator, config.tls.files(), server_name=config.server_name, chunk_bytes=config.chunk_bytes
    ) as client:
        join = await client.join(num_examples=0, privacy=announced(config.privacy))  # checked there too
        s = join.settings
        print(f"identity        {join.agent_id}")
        validity = publish_validity(config.tls.files())
        days = (validity.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        soon = validity.expiring()
        print(f"certificate     valid until {validity.not_after:%Y-%m-%d %H:%M} UTC ({days:.0f} days)")
        if soon is not None:
            print(f"                WARNING: {soon}")
        print(f"federation      {s.federation_id} (model {s.model_id or '-'})")
        print(f"codec           {s.codec.name}; secure aggregation {'on' if s.secagg.enabled else 'off'}")
        print(f"privacy         {describe(config.privacy, s)}")
        print(f"dp              {describe_dp(config.privacy.dp, config.state_dir)}")
        print(f"cpu             {process_plan(config.cpu_threads).describe()}")
        served = await client.revocation_list() if config.tls.crl_from_aggregator else None
        revocations = AgentRevocations(config.state_dir, config.tls).for_round(served)  # or exit 2
        print(f"revocations     {describe_revocations(revocations, served is not None)}")
        numel = sum(math.prod(p.shape) for p in s.layout.params)
        tensors, digest = len(s.layout.params), s.layout.digest[:16]
        print(f"layout          {tensors} tensors, {numel} parameters, digest {digest}")
        print(f"model           {await asyncio.to_thread(_model_line, config, s.model_id, numel)}")
        print(f"chunk limit     {s.chunk_limits.max_chunk_bytes} bytes")
        models = config.state_dir / "models"
        models.mkdir(parents=True, exist_ok=True)
        header = await client.download_model(
            models / f"v{join.global_version:08d}.safetensors", join.global_version
        )
        print(f"global version  {header.version}: {header.total_bytes} bytes, sha256 verified")
    store = TokenStore(config.state_dir / "tokens")  # a bad record fails the preflight, as `run` would
    corpus = await asyncio.to_thread(
        store.corpus, config.data, config.eval_fraction, tokenize, config.privacy.dp.users
    )
    if tokenize:
        await asyncio.to_thread(_tokenize, config, store, corpus, s)
    print(f"data            {store.describe(corpus)}")
    dp = config.privacy.dp
    if dp.enabled:
        t = s.training
        capped = corpus.capped_records(dp.records_per_user)
        plan = preview(dp, config.state_dir, corpus.train_units, t.batch_size, t.local_steps, ranks, capped)
        print(f"dp plan         {plan}")
        if config.privacy.share_eval_losses:
            print(f"dp eval plan    {eval_preview(dp, config.state_dir, corpus.eval_units)}")
    check_federation(config.privacy, s)  # a refusal fails the preflight (exit 2), as `run` would
    return 0


def _model_line(config: AgentConfig, model_id: str, adapter: int) -> str:
    """``check``'s model line: the base's weights on this agent's device at its precision
    (``agent.model_plan``), or why its config cannot be read."""
    from agent.model_plan import describe as describe_model
    from agent.trainer import pick_device, pick_dtype

    model = config.model or model_id
    if not model:
        return "none named: set `model`, or the federation's model_id"
    device = pick_device(config.device)
    try:
        return describe_model(model, config.precision, pick_dtype(config.precision, device), device, adapter)
    except (OSError, ValueError) as exc:  # check downloads nothing; `run` may fetch a hub id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{model!r}: its config is not on this machine ({first})"


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _tokenize(
    config: AgentConfig, store: TokenStore, corpus: Corpus, settings: pb.FederationSettings
) -> None:
    """Build the token store's entry for the federation's tokenizer and sequence length."""
    import numpy as np
    from transformers import AutoTokenizer

    from agent.token_store import open_entry
    from common.errors import ConfigError

    model = config.model or settings.model_id
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load the tokenizer of {model!r}: {exc}") from exc
    length, per_record = settings.training.sequence_length, config.privacy.dp.enabled
    entry = store.prepare(corpus, tokenizer, length, per_record)
    rows = ", a record a row (DP)" if per_record else ""
    users = open_entry(entry, length).train_users
    if users is not None:
        rows += f", {len(np.unique(users))} training users from {corpus.user_field!r}"
    print(f"tokens          {entry} ({length} tokens a block{rows})")


async def export(config: AgentConfig, args: argparse.Namespace) -> int:
    """Download a global version and write it as a peft adapter directory (merged with ``--merge``)."""
    import json
    import tempfile

    from safetensors.torch import load_file

    from agent.client import AggregatorClient
    from agent.export import ExportError, write_export
    from agent.trainer import LoraSpec

    if args.version is not None and args.version < 1:
        raise ExportError("--version must be >= 1 (the aggregator's export can write version 0)")
    async with AggregatorClient(
        config.aggregator, config.tls.files(), server_name=config.server_name, chunk_bytes=config.chunk_bytes
    ) as client:
        join = await client.join(num_examples=0)  # no policy: an export sends no update
        config.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=config.state_dir, prefix=".export.") as tmp:
            path = Path(tmp) / "adapter.safetensors"
            header = await client.download_model(path, args.version or 0)
            tensors = load_file(path)
    s = join.settings
    history = config.state_dir / "evals.jsonl"
    own = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    mine = next((r for r in reversed(own) if r.get("version") == header.version), None)
    provenance = {
        "federation_id": s.federation_id,
        "version": header.version,
        "checkpoint_sha256": header.sha256.hex(),
        "layout_digest": s.layout.digest,
        "downloaded_by": join.agent_id,
        "aggregator": config.aggregator,
        "evals": {join.agent_id: {"eval_loss": mine["eval_loss"], "tokens": mine["tokens"]}} if mine else {},
    }
    lora = LoraSpec(s.lora.rank, s.lora.alpha, tuple(s.lora.target_modules), s.lora.dropout)
    base = args.base or config.model or s.model_id
    await asyncio.to_thread(write_export, args.out, tensors, lora, base, provenance, args.merge, args.force)
    merged = f" and {args.out / 'merged'}" if args.merge else ""
    print(f"exported global version {header.version} (sha256 verified) to {args.out}{merged}")
    return 0


async def run(config: AgentConfig, ctx: DistContext) -> int:
    """Rank 0 (or the only process): the daemon until SIGTERM/SIGINT or max_rounds."""
    from agent.daemon import Agent

    agent = Agent(config, ctx)
    if config.metrics_listen:
        from common.metrics import serve_metrics

        serve_metrics(config.metrics_listen, config.metrics_tls())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    health = None
    if config.health_listen:
        from common.health import HealthPort

        health = HealthPort(config.health_listen)
        await health.start()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(stop))
    sdnotify.notify("READY=1", f"STATUS=agent for {config.aggregator}")
    try:
        await agent.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        stop.set()
        await watchdog
        if health is not None:
            await health.stop()
        await asyncio.to_thread(agent.stop_followers)
    return 0


def run_ranks(config: AgentConfig) -> int:
    """Under torchrun, rank 0 runs the daemon and the other ranks follow it; else just the daemon."""
    from agent.daemon import Worker
    from agent.distributed import init_from_env, shutdown
    from agent.trainer import pick_device

    threads = set_torch_threads(config.cpu_threads)
    ctx = init_from_env(pick_device(config.device))
    if ctx.is_leader:
        log.info("%s", threads.describe())
    clean = False
    try:
        if ctx.is_leader:
            code = asyncio.run(run(config, ctx))
        else:
            Worker(config, ctx).follow()
            code = 0
        clean = True
        return code
    finally:
        shutdown(ctx, clean)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="cloudfed-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("CLOUDFED_AGENT_CONFIG"),
        help="TOML config (or $CLOUDFED_AGENT_CONFIG); env vars CLOUDFED_AGENT_<FIELD> override it",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    check_cmd = sub.add_parser("check", help="connect, join and download the latest global version")
    check_cmd.add_argument(
        "--tokenize",
        action="store_true",
        help="also tokenize the data into the token store (the federation's model and sequence length)",
    )
    check_cmd.add_argument(
        "--ranks",
        type=_positive,
        default=1,
        help="torchrun ranks `run` will train on (the DP plan adds their batches)",
    )
    run_cmd = sub.add_parser("run", help="run the agent daemon: train and upload every round")
    run_cmd.add_argument("--audit-dir", type=Path, help="keep a copy of every update sent, with its metadata")
    out = sub.add_parser(
        "export", help="download a global version and write it as a peft LoRA adapter directory"
    )
    out.add_argument(
        "--out", type=Path, required=True, help="directory to write (replaced whole with --force)"
    )
    out.add_argument("--version", type=int, help="global version to export (default: the latest)")
    out.add_argument(
        "--merge", action="store_true", help="also write merged/: the base model with the adapter folded in"
    )
    out.add_argument("--base", help="base model path or hub id (default: 'model', else the federation's)")
    out.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = p.parse_args(argv)
    try:
        config = load(AgentConfig, args.config)
        if getattr(args, "audit_dir", None) is not None:
            config = dataclasses.replace(config, audit_dir=args.audit_dir.resolve())
        config = config.validate()
        setup_logging(config.log_level, config.log_format, "agent")
        if args.cmd == "export":
            return asyncio.run(export(config, args))
        if args.cmd == "check":
            return asyncio.run(check(config, args.tokenize, args.ranks))
        return run_ranks(config)
    except CloudfedError as exc:
        print(f"cloudfed-agent: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"cloudfed-agent: aggregator said {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
