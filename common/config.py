"""Configuration: frozen dataclasses loaded from TOML, overridden by env vars.

Every field is documented where it is declared. A value at ``a.b.c`` in TOML
(``[a.b] c = ...``) is overridden by the env var ``<PREFIX>_A_B_C``. Errors
name the field: ``tls.cert: file not found: /x.pem``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from common.cert_validity import Validity
from common.chunks import MAX_CHUNK_BYTES, validate_chunk_bytes
from common.errors import CloudfedError, ConfigError
from common.identity import IdentityError, SpiffeId
from common.logs import LOG_FORMATS
from common.metrics_server import MetricsTls
from common.revocation import RevocationError, RevocationList
from common.secagg.coverage import MIN_SENDERS, check_settings, senders_of
from common.secagg.graph import check_parameters
from common.secagg.ring import check_headroom, coordinate_bits, levels_bits
from common.tls import TlsFiles

T = TypeVar("T")
KNOWN_CODECS = ("identity", "quantize", "projection", "topk", "eigen", "autoencoder", "countsketch")


@dataclass(frozen=True)
class TlsConfig:
    """mTLS material."""

    cert: Path = Path("tls/cert.pem")
    """PEM certificate of this daemon."""
    key: Path = Path("tls/key.pem")
    """PEM private key of this daemon (mode 0600)."""
    ca: Path = Path("tls/ca.pem")
    """PEM CA certificate(s) that sign the federation's certificates (a bundle during a CA rotation)."""
    crl: Path | None = None
    """PEM CRL(s) signed by the CA (``cloudfed-pki revoke`` writes one). The aggregator refuses the
    certificates it lists on every call, ends their calls in flight and re-reads it when the file
    changes and on reload, keeping the last good list when a new file is bad, and serves it to
    agents; an agent refuses a secure-aggregation roster naming one (it reads the file, and the
    aggregator's list, at each round)."""

    def files(self, base: Path | None = None) -> TlsFiles:
        """TlsFiles with relative paths resolved against ``base``."""
        root = base or Path()
        return TlsFiles(root / self.cert, root / self.key, root / self.ca)

    def check_crl(self) -> None:
        """Raise ConfigError if the CRL is set but missing, unreadable or not signed by the CA."""
        if self.crl is None:
            return
        if not Path(self.crl).is_file():
            raise ConfigError(f"tls.crl: file not found: {self.crl}")
        try:
            RevocationList.load(self.crl, self.ca)
        except RevocationError as exc:
            raise ConfigError(f"tls.crl: {exc}") from exc


@dataclass(frozen=True)
class AggregatorTlsConfig(TlsConfig):
    """mTLS material of the aggregator, with how often it looks for a new CRL."""

    crl_poll_s: float = 10.0
    """Seconds between checks of the CRL file for changes."""

    def check_crl(self) -> None:
        """As TlsConfig.check_crl, and the poll interval is positive."""
        super().check_crl()
        if not self.crl_poll_s > 0:
            raise ConfigError(f"tls.crl_poll_s must be positive, got {self.crl_poll_s}")


@dataclass(frozen=True)
class AgentTlsConfig(TlsConfig):
    """mTLS material of an agent, and where it gets the revocations it checks rosters against."""

    crl_from_aggregator: bool = True
    """Also check secure-aggregation rosters against the CRL the aggregator serves (verified
    against ``ca``; never older than the newest this agent has seen)."""


@dataclass(frozen=True)
class LimitsConfig:
    """Streaming limits enforced by the aggregator."""

    max_chunk_bytes: int = MAX_CHUNK_BYTES
    """Largest chunk payload accepted (4 KiB .. 1 MiB)."""
    max_update_bytes: int = 4 * 1024**3
    """Largest whole update accepted, in bytes."""


@dataclass(frozen=True)
class RoundsConfig:
    """How the aggregator runs rounds."""

    min_agents: int = 2
    """Agents that must be connected before a round starts."""
    max_agents: int = 1000
    """Most agents taking part in one round."""
    upload_deadline_s: float = 1800.0
    """Seconds agents have to train and upload once a round starts."""
    min_uploads: int = 0
    """Uploads needed to aggregate after the deadline (0: min_agents)."""
    retry_delay_s: float = 5.0
    """Pause before retrying an abandoned round."""
    max_versions: int = 0
    """The federation finishes once the global version reaches this (0: no limit)."""
    early_stop_patience: int = 0
    """The federation finishes once this many versions were evaluated after the best one without
    lowering the token-weighted eval loss by more than ``early_stop_min_delta`` (0: off). Versions
    are compared as ``export --version best`` compares them."""
    early_stop_min_delta: float = 0.0
    """How much lower an eval loss must be to count as an improvement."""
    early_stop_noise_sigmas: float = 0.0
    """How many standard deviations of the noise that differential privacy adds to agents' eval
    losses an improvement must exceed too (beyond ``early_stop_min_delta``). Noise already makes
    early stopping stop sooner (a lucky low draw becomes the loss later versions must beat); a
    positive value makes it stop sooner still, saving rounds at a cost in loss. With noised
    losses, raise ``early_stop_patience`` instead (``python -m bench.noisy_evals``)."""


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation: the aggregator learns only the sum of masked updates."""

    enabled: bool = False
    """Mask every update (the shipped deployment configs turn this on)."""
    threshold: int = 0
    """Shamir threshold t; 0 picks the least safe one each round: more than half of each
    neighbourhood (all agents, or k + 1) plus ``colluders``."""
    colluders: int = 0
    """Agents that may collude with the aggregator, whose thresholds must then satisfy
    2t > k + 1 + colluders (each colluder reveals both kinds of share). At most rounds.min_agents - 2:
    a sum over the colluders and one more agent is that agent's update."""
    neighbours: int = 0
    """k of the random k-regular neighbour graph (SecAgg+); 0 = every agent masks with every other."""
    clip: float = 0.1
    """Clip bound of each weighted update coordinate before fixed-point encoding."""
    bits: int = 20
    """Fixed-point bits per coordinate (codes 0 .. 2^bits - 1); max_agents (2^bits - 1) must be
    below 2^31."""
    levels: int = 0
    """Code levels per coordinate when not a power of two (3: ternary); 0 = 2^bits. Overrides bits.
    A masked coordinate costs about log2(n (levels - 1) + 1) bits with n agents (codes packed)."""
    key_deadline_s: float = 60.0
    """Seconds each key phase (advertise, share, unmask) waits for the agents."""
    adaptive_clip: float = 0.0
    """Clip each segment of coordinates at this multiple of its RMS in the previous round's
    aggregate (``clip`` in the first round); 0 keeps the one fixed ``clip``. 3.0 suits 3-8 bits,
    2.0 suits 2 bits, 1.5 ternary codes (fewer levels want a tighter clip); README, Compression,
    has the figures."""
    clip_segment: int = 1024
    """Coordinates per adaptive clip bound."""
    coverage: int = 0
    """Agents that send each element of a masked update (at least 2; 0: every agent). Each agent
    uploads about coverage / n of its elements, and each element's codes sum over ``coverage``
    agents, a narrower ring: 2 of 4 agents at 2 bits cost 1.4 bits a coordinate instead of 3.7.
    The aggregator then learns each element's sum over its senders, not over all agents (README,
    Secure aggregation). Needs ``neighbours = 0``."""

    @property
    def code_levels(self) -> int:
        """Levels of each agent's codes: ``levels``, or 2^bits."""
        return self.levels or 1 << self.bits

    @property
    def weight_bits(self) -> int:
        """Bits of each digit of a masked update's weight: floor(log2 levels)."""
        return levels_bits(self.code_levels)

    def ring_bits(self, max_agents: int) -> int:
        """The most bits a masked coordinate may cost: the least one-code ring no sum of
        ``max_agents`` codes wraps (each round's layout is sized for the agents it invites), or
        of ``coverage`` codes."""
        return coordinate_bits(self.code_levels, senders_of(self.coverage, max_agents))


@dataclass(frozen=True)
class CheckpointsConfig:
    """Which global versions keep their checkpoint on disk. A pruned version's manifest stays
    (``checkpoints/pruned/``: the lineage); its tensors go. Version 0 and the latest always stay."""

    keep_last: int = 0
    """The newest versions kept, at least 2 (an agent may still be fetching the one before the
    latest); 0 keeps every version (the disk grows by one adapter a round)."""
    keep_every: int = 0
    """Also keep every version divisible by this (milestones); 0: none."""
    keep_best: int = 1
    """Also keep this many versions with the lowest token-weighted eval loss, ranked as
    ``export --version best`` ranks them (so the best so far can always be exported)."""


LINEAR_CODECS = ("identity", "quantize", "projection", "eigen", "countsketch")
"""Codecs whose decoder is linear: decode(sum) = sum of decodes."""


@dataclass(frozen=True)
class FederationConfig:
    """What the federation trains; sent to agents in Join."""

    federation_id: str = "cloudfed"
    """Name of the federation."""
    model_id: str = ""
    """Base model: hub id or a path each agent resolves locally."""
    codec: str = "identity"
    """Update codec: identity, quantize, projection, topk, eigen, autoencoder or countsketch (README,
    Compression)."""
    codec_state: Path | None = None
    """``eigen``: the bases file (``python -m agent.eigen_bases``); served to agents by digest."""
    autoencoder_decoder: str = "linear"
    """``autoencoder``: 'linear' (sums decode: works under secure aggregation) or 'mlp' (trusted only)."""
    autoencoder_warmup_rounds: int = 2
    """``autoencoder``: full rounds whose updates TGAP pre-trains on before encoding starts (each
    agent's without secure aggregation, the round means with it)."""
    autoencoder_refresh_every: int = 3
    """``autoencoder``: after training, every n-th round is full again and FAF fine-tunes (0: never)."""
    autoencoder_block: int = 64
    """``autoencoder``: values per encoded block (codes per block: block / codec_ratio)."""
    autoencoder_hidden: int = 128
    """``autoencoder``: hidden width of the encoder (and of the MLP decoder)."""
    codec_ratio: float = 16.0
    """Compression ratio against float32 for projection, topk, countsketch and autoencoder."""
    fetchsgd_topk: float = 0.1
    """``countsketch``: coordinates FetchSGD's server loop updates each round, as a fraction of the
    sketch's width (columns a row); near 1 the sketch's estimation errors feed back and diverge."""
    fetchsgd_momentum: float = 0.0
    """``countsketch``: momentum rho of FetchSGD's sketch-space accumulator, 0 <= rho < 1. Agents'
    updates are already steps (many local steps each), and momentum makes a steady one 1/(1-rho)
    times longer, so it is off unless asked for."""
    codec_bits: int = 8
    """Bits per parameter for quantize (2..16)."""
    codec_clip: float = 0.1
    """Clip bound of each update coordinate for quantize (with ``codec_segment``: a multiple of
    each segment's RMS, 2-3)."""
    codec_segment: int = 0
    """``quantize``: 0 = the one shared ``codec_clip`` (linear); n = each agent clips every n values
    at ``codec_clip`` x their own RMS and sends the bounds (32 / n bits a value more); each payload
    then decodes on its own, so secure aggregation is refused, as for topk."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names the adapter wraps."""
    local_steps: int = 10
    """Local optimiser steps per round."""
    learning_rate: float = 1e-3
    """Local learning rate."""
    batch_size: int = 4
    """Local batch size."""
    sequence_length: int = 128
    """Tokens per training example."""
    seed: int = 0
    """Base seed for shuffling and codec randomness."""
    server_optimizer: str = "fedavg"
    """How the aggregator applies the mean update: 'fedavg' or 'fedadam' (Reddi et al. 2021)."""
    server_lr: float = 1.0
    """Server learning rate (1.0 is plain FedAvg; FedAdam wants ~0.01)."""


@dataclass(frozen=True)
class MetricsTlsFields:
    """TLS for a daemon's /metrics endpoint (plain HTTP when unset)."""

    metrics_cert: Path | None = None
    """Serve /metrics over TLS with this certificate (and metrics_key)."""
    metrics_key: Path | None = None
    """Private key for metrics_cert."""
    metrics_client_ca: Path | None = None
    """Require scrapers to present a certificate from this CA (needs metrics_cert)."""

    def metrics_tls(self) -> MetricsTls | None:
        """The endpoint's TLS files, or None for plain HTTP."""
        if self.metrics_cert is None or self.metrics_key is None:
            return None
        return MetricsTls(self.metrics_cert, self.metrics_key, self.metrics_client_ca)

    def check_metrics_tls(self) -> None:
        """Both files or neither, a client CA only with them, and files that make a TLS server."""
        if (self.metrics_cert is None) != (self.metrics_key is None):
            raise ConfigError("metrics_cert and metrics_key: set both to serve /metrics over TLS, or neither")
        tls = self.metrics_tls()
        if tls is None:
            if self.metrics_client_ca is not None:
                raise ConfigError(
                    "metrics_client_ca: client certificates need TLS; set metrics_cert and metrics_key"
                )
            return
        named = {"metrics_cert": tls.cert, "metrics_key": tls.key, "metrics_client_ca": tls.client_ca}
        for name, path in named.items():
            if path is not None and not path.is_file():
                raise ConfigError(f"{name}: file not found: {path}")
        try:
            tls.context()
        except ssl.SSLError as exc:
            raise ConfigError(
                f"metrics_cert, metrics_key, metrics_client_ca: unusable for TLS: {exc}"
            ) from None


@dataclass(frozen=True)
class AggregatorConfig(MetricsTlsFields):
    """The aggregator daemon."""

    ENV_PREFIX: ClassVar[str] = "CLOUDFED"

    listen: str = "0.0.0.0:7443"
    """host:port of the mTLS federation API."""
    health_listen: str = "0.0.0.0:7080"
    """host:port of the plaintext gRPC health service for probes ('' disables)."""
    state_dir: Path = Path("/var/lib/cloudfed")
    """Where uploads, checkpoints and the database live."""
    trust_domain: str = "cloudfed.local"
    """SPIFFE trust domain of the agents."""
    allowed_agents: tuple[str, ...] = ()
    """SPIFFE id patterns allowed to join (fnmatch); empty allows the whole trust domain."""
    enable_reflection: bool = False
    """Serve gRPC reflection on the health port."""
    enable_channelz: bool = False
    """Serve channelz on the health port."""
    max_connection_age_s: float = 3600.0
    """Recycle connections after this long (picks up rotated certificates)."""
    metrics_listen: str = "0.0.0.0:9464"
    """host:port of the Prometheus /metrics endpoint ('' disables)."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "text"
    """``text`` (a line a record) or ``json`` (an object a line: time, level, logger, message)."""
    cpu_threads: int = 0
    """torch CPU threads (server optimizer, autoencoder, decoding); 0: $OMP_NUM_THREADS if set, else
    the CPUs this process may use (its affinity and the cgroup CPU quota of a container or unit)."""
    tls: AggregatorTlsConfig = field(default_factory=AggregatorTlsConfig)
    """mTLS material and the CA's revocation list."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Streaming limits."""
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    """Round policy."""
    federation: FederationConfig = field(default_factory=FederationConfig)
    """What is trained."""
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    """Secure aggregation."""
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    """Which global versions keep their checkpoint on disk."""

    def validate(self) -> AggregatorConfig:
        """Check cross-field rules; raise ConfigError naming the field."""
        _check_hostport(self.listen, "listen")
        _check_log_format(self.log_format)
        if self.health_listen:
            _check_hostport(self.health_listen, "health_listen")
        if self.metrics_listen:
            _check_hostport(self.metrics_listen, "metrics_listen")
            self.check_metrics_tls()
        _check_cpu_threads(self.cpu_threads)
        try:
            SpiffeId.validate_trust_domain(self.trust_domain)
        except IdentityError as exc:
            raise ConfigError(f"trust_domain: {exc}") from exc
        for pattern in self.allowed_agents:
            if not pattern.startswith(f"spiffe://{self.trust_domain}/"):
                raise ConfigError(f"allowed_agents: {pattern!r} is not in trust domain {self.trust_domain}")
        try:
            validate_chunk_bytes(self.limits.max_chunk_bytes, "limits.max_chunk_bytes")
        except CloudfedError as exc:
            raise ConfigError(str(exc)) from exc
        if self.limits.max_update_bytes <= 0:
            raise ConfigError("limits.max_update_bytes must be positive")
        r = self.rounds
        if r.min_agents < 1:
            raise ConfigError("rounds.min_agents must be at least 1")
        if r.max_agents < r.min_agents:
            raise ConfigError(
                f"rounds.min_agents ({r.min_agents}) exceeds rounds.max_agents ({r.max_agents})"
            )
        exact_ids = not any(c in p for p in self.allowed_agents for c in "*?[")
        if self.allowed_agents and exact_ids and r.min_agents > len(self.allowed_agents):
            n = len(self.allowed_agents)
            raise ConfigError(f"rounds.min_agents ({r.min_agents}) exceeds the {n} allowed agents")
        if r.upload_deadline_s <= 0:
            raise ConfigError("rounds.upload_deadline_s must be positive")
        if r.max_versions < 0 or r.early_stop_patience < 0 or not r.early_stop_min_delta >= 0:
            raise ConfigError(
                "rounds.max_versions, rounds.early_stop_patience and rounds.early_stop_min_delta must be >= 0"
            )
        if not 0 <= r.early_stop_noise_sigmas < math.inf:
            raise ConfigError(
                "rounds.early_stop_noise_sigmas must be a finite number >= 0, not"
                f" {r.early_stop_noise_sigmas}"
            )
        if self.federation.server_optimizer not in ("fedavg", "fedadam"):
            raise ConfigError(
                f"federation.server_optimizer: unknown {self.federation.server_optimizer!r}; "
                "known: fedavg, fedadam"
            )
        if not self.federation.server_lr > 0:
            raise ConfigError("federation.server_lr must be positive")
        if self.federation.codec not in KNOWN_CODECS:
            raise ConfigError(
                f"federation.codec: unknown codec {self.federation.codec!r}; known: {KNOWN_CODECS}"
            )
        if not self.federation.codec_ratio >= 1:
            raise ConfigError("federation.codec_ratio must be >= 1")
        if not 2 <= self.federation.codec_bits <= 16:
            raise ConfigError("federation.codec_bits must be in 2..16")
        if not self.federation.codec_clip > 0:
            raise ConfigError("federation.codec_clip must be positive")
        if self.federation.codec_segment < 0:
            raise ConfigError("federation.codec_segment must be >= 0")
        state = self.federation.codec_state
        if self.federation.codec == "eigen" and (state is None or not state.is_file()):
            raise ConfigError(
                f"federation.codec_state: codec 'eigen' needs its bases file; {state} is not a file"
                " (make one with python -m agent.eigen_bases)"
            )
        self._validate_autoencoder()
        self._validate_fetchsgd()
        self._validate_secagg()
        c = self.checkpoints
        if c.keep_last == 1 or c.keep_last < 0:
            raise ConfigError(
                f"checkpoints.keep_last must be 0 (keep every version) or at least 2, not {c.keep_last}:"
                " an agent may still be fetching the version before the latest"
            )
        if c.keep_every < 0 or c.keep_best < 0:
            raise ConfigError("checkpoints.keep_every and checkpoints.keep_best must be >= 0")
        _check_tls(self.tls)
        self.tls.check_crl()
        return self

    def _validate_fetchsgd(self) -> None:
        f = self.federation
        if f.codec != "countsketch":
            return
        if not 0 < f.fetchsgd_topk <= 1:
            raise ConfigError(f"federation.fetchsgd_topk must be in (0, 1], got {f.fetchsgd_topk}")
        if not 0 <= f.fetchsgd_momentum < 1:
            raise ConfigError(f"federation.fetchsgd_momentum must be in [0, 1), got {f.fetchsgd_momentum}")
        if not f.codec_ratio >= 1:
            raise ConfigError(f"federation.codec_ratio must be >= 1 for countsketch, got {f.codec_ratio}")

    def _validate_autoencoder(self) -> None:
        f = self.federation
        if f.codec != "autoencoder":
            return
        if f.autoencoder_decoder not in ("linear", "mlp"):
            raise ConfigError(
                f"federation.autoencoder_decoder must be 'linear' or 'mlp', got {f.autoencoder_decoder!r}"
            )
        if f.autoencoder_warmup_rounds < 1 or f.autoencoder_refresh_every < 0:
            raise ConfigError(
                "federation.autoencoder_warmup_rounds must be >= 1 and autoencoder_refresh_every >= 0"
            )
        if not 1 <= f.codec_ratio <= f.autoencoder_block or f.autoencoder_hidden < 1:
            raise ConfigError(
                "federation.codec_ratio must be in 1..autoencoder_block, autoencoder_hidden >= 1"
            )
        if self.secagg.enabled and f.autoencoder_decoder != "linear":
            raise ConfigError(
                "secagg: autoencoder_decoder 'mlp' is nonlinear: it needs each agent's codes, which masking"
                " hides; use autoencoder_decoder = 'linear' or disable secagg"
            )

    def _validate_secagg(self) -> None:
        sa, r = self.secagg, self.rounds
        if not sa.enabled:
            return
        if self.federation.codec not in (*LINEAR_CODECS, "autoencoder"):  # its decoder: checked above
            raise ConfigError(
                f"secagg: codec {self.federation.codec!r} has a nonlinear decoder, which needs each agent's"
                " update and so cannot work with masking; use a linear codec or disable secagg"
            )
        if self.federation.codec == "quantize":
            raise ConfigError(
                "secagg: codec 'quantize' would quantise twice; secure aggregation already sends"
                " secagg.bits-bit fixed point, so use codec 'identity' (or 'projection') and set secagg.bits"
            )
        if r.min_agents < 2:
            raise ConfigError("secagg: needs rounds.min_agents >= 2 (one agent's sum is its update)")
        if sa.threshold and sa.threshold > r.min_agents:
            raise ConfigError(
                f"secagg.threshold ({sa.threshold}) is above rounds.min_agents ({r.min_agents}):"
                " a round with the minimum number of agents could never unmask"
            )
        if sa.threshold == 1:
            raise ConfigError("secagg.threshold must be at least 2 (1 would let anyone unmask alone)")
        if sa.neighbours < 0:
            raise ConfigError("secagg.neighbours must be >= 0")
        if not 0 <= sa.colluders <= r.min_agents - 2:
            raise ConfigError(
                f"secagg.colluders must be in 0..rounds.min_agents - 2 ({r.min_agents - 2}), got"
                f" {sa.colluders}: a round's sum over the colluders and one more agent is that agent's update"
            )
        if sa.colluders and sa.coverage and sa.coverage < sa.colluders + 2:
            raise ConfigError(
                f"secagg.coverage ({sa.coverage}) must be at least secagg.colluders + 2: an element sent by"
                " the colluders and one more agent is that agent's value"
            )
        if sa.neighbours and sa.threshold:
            try:
                agents = max(r.min_agents, sa.neighbours + 1)
                check_parameters(agents, sa.neighbours, sa.threshold, sa.colluders)
            except ConfigError as exc:
                raise ConfigError(f"secagg: {exc}") from exc
        if sa.threshold and not sa.neighbours and 2 * sa.threshold <= r.max_agents + sa.colluders:
            against = f" plus secagg.colluders ({sa.colluders})" if sa.colluders else ""
            raise ConfigError(
                f"secagg.threshold ({sa.threshold}) with the full graph must be more than half of every"
                f" round's agents, up to rounds.max_agents ({r.max_agents}){against}: larger rounds would"
                " be refused (below that an aggregator could collect both of an agent's secrets); leave"
                " it 0 for the least safe threshold of each round"
            )
        if not sa.clip > 0:
            raise ConfigError("secagg.clip must be positive")
        if not 1 <= sa.bits <= 30:
            raise ConfigError(f"secagg.bits must be in 1..30, got {sa.bits}")
        if sa.levels and not 2 <= sa.levels <= 1 << 30:
            raise ConfigError(f"secagg.levels must be 0 (2^bits) or in 2..2^30, got {sa.levels}")
        try:
            check_headroom(sa.code_levels, r.max_agents)
        except ConfigError as exc:
            raise ConfigError(f"secagg: {exc}") from exc
        if sa.key_deadline_s <= 0:
            raise ConfigError("secagg.key_deadline_s must be positive")
        if not (sa.adaptive_clip >= 0 and math.isfinite(sa.adaptive_clip)):
            raise ConfigError(f"secagg.adaptive_clip must be >= 0 (0: fixed clip), got {sa.adaptive_clip}")
        if sa.clip_segment < 1:
            raise ConfigError(f"secagg.clip_segment must be >= 1, got {sa.clip_segment}")
        check_settings(sa.coverage, sa.neighbours)


DP_ACCOUNTANTS = ("rdp", "prv")
DP_UNITS = ("record", "user")


@dataclass(frozen=True)
class DpConfig:
    """Differential privacy of this cloud's training data (DP-SGD in the agent): every update this
    agent sends is (epsilon, delta)-DP with respect to any one of its training records (``unit =
    "record"``) or all the records of any one user (``"user"``), whatever the aggregator or
    anyone else later does with it."""

    enabled: bool = False
    """Train with DP-SGD: Poisson-sampled records, each record's gradient clipped, Gaussian noise."""
    max_epsilon: float = 8.0
    """The privacy budget: this agent declines every round that would take its epsilon, over all
    the rounds it ever trained (kept in the state dir), above this."""
    delta: float = 1e-6
    """The delta of the (epsilon, delta) guarantee; it must be below 1 / (training records)."""
    max_grad_norm: float = 1.0
    """Each record's gradient is clipped to this L2 norm."""
    noise_multiplier: float = 0.0
    """Noise standard deviation over max_grad_norm; 0: the smallest that lets planned_rounds
    rounds fit in max_epsilon."""
    planned_rounds: int = 0
    """Rounds the budget should last when noise_multiplier is 0."""
    accountant: str = "rdp"
    """``rdp`` (Renyi DP, Mironov 2017) or ``prv`` (privacy random variables, Gopi et al. 2021:
    tighter, the same noise yields a smaller epsilon)."""
    unit: str = "record"
    """What is protected: ``record`` (each record is one example) or ``user`` (DP-SGD samples
    users, and clips each sampled user's mean gradient over their records)."""
    user_field: str = "user"
    """With ``unit = "user"``: the JSONL field that names each record's user (a dotted path such
    as ``meta.user_id`` reaches into nested objects)."""
    records_per_user: int = 8
    """With ``unit = "user"``: the most records of a sampled user a step takes (drawn at random
    when the user has more); bounds a step's work, not the guarantee."""
    count_noise: float = 20.0
    """Standard deviation of the Gaussian noise on the counts this agent announces (its
    training records, its FedAvg weight; with ``unit = "user"`` also its users, and the weight's
    noise is times ``records_per_user``): the counts are covered by the guarantee too (20 costs
    under 0.1% more noise in the rounds at epsilon 8, about 1% at epsilon 1)."""
    eval_noise: float = 20.0
    """With ``privacy.share_eval_losses``: standard deviation, over ``eval_loss_clip``, of the
    Gaussian noise on each version's eval loss as it leaves the cloud. The loss released is the
    mean over held-out records (or users) of each one's mean token loss, clipped to
    ``eval_loss_clip``, with noise of deviation ``eval_noise * eval_loss_clip`` on the sum; its
    held-out records and their tokens are released noised as the training counts are. Held-out
    records are never trained on, so these releases have a budget of their own
    (``max_epsilon`` too), beside the training rounds'."""
    eval_loss_clip: float = 10.0
    """With DP and shared eval losses: each held-out record's (or user's) mean token loss is
    clipped to this many nats before it is summed."""
    eval_max_deviation: float = 0.1
    """With DP and shared eval losses: share them only while the noise on a released loss
    (``eval_noise * eval_loss_clip`` over the held-out records, or users, as released) has at
    most this deviation in nats; noisier ones would rank versions on noise, and stay in this
    cloud, spending nothing more (inf: always share)."""

    def validate(self) -> DpConfig:
        """ConfigError naming the field."""
        if not self.enabled:
            return self
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ConfigError(f"privacy.dp.max_epsilon must be > 0, got {self.max_epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.dp.delta must be between 0 and 1, got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"privacy.dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"privacy.dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.planned_rounds < 0:
            raise ConfigError(f"privacy.dp.planned_rounds must be >= 0, got {self.planned_rounds}")
        if self.noise_multiplier == 0 and self.planned_rounds == 0:
            raise ConfigError(
                "privacy.dp: set noise_multiplier, or planned_rounds (>= 1) to derive it from max_epsilon"
            )
        if self.accountant not in DP_ACCOUNTANTS:
            raise ConfigError(
                f"privacy.dp.accountant: expected one of {', '.join(DP_ACCOUNTANTS)}, got {self.accountant!r}"
            )
        if self.unit not in DP_UNITS:
            raise ConfigError(f"privacy.dp.unit: expected one of {', '.join(DP_UNITS)}, got {self.unit!r}")
        if self.unit == "user" and not self.user_field:
            raise ConfigError("privacy.dp.user_field must name the JSONL field holding each record's user")
        if self.records_per_user < 1:
            raise ConfigError(f"privacy.dp.records_per_user must be >= 1, got {self.records_per_user}")
        if not (math.isfinite(self.count_noise) and self.count_noise > 0):
            raise ConfigError(f"privacy.dp.count_noise must be > 0, got {self.count_noise}")
        if not (math.isfinite(self.eval_noise) and self.eval_noise > 0):
            raise ConfigError(f"privacy.dp.eval_noise must be > 0, got {self.eval_noise}")
        if not (math.isfinite(self.eval_loss_clip) and self.eval_loss_clip > 0):
            raise ConfigError(f"privacy.dp.eval_loss_clip must be > 0, got {self.eval_loss_clip}")
        if not self.eval_max_deviation > 0:  # inf allowed, NaN not
            raise ConfigError(f"privacy.dp.eval_max_deviation must be > 0, got {self.eval_max_deviation}")
        return self

    @property
    def users(self) -> str:
        """The field naming each record's user when users are protected, else empty."""
        return self.user_field if self.enabled and self.unit == "user" else ""


@dataclass(frozen=True)
class PrivacyConfig:
    """What this agent requires before any update leaves its cloud. Checked when it joins (a
    federation that breaks it is refused and the daemon exits) and in every round (a round that
    breaks it is sat out)."""

    require_masking: bool = True
    """Send only masked updates: refuse a federation without secure aggregation, whose aggregator
    would see this cloud's update (false: trust the aggregator, e.g. for top-k or a nonlinear
    autoencoder)."""
    min_agents_per_sum: int = 2
    """The fewest agents whose masked sum the aggregator may learn for any coordinate: refuse a
    federation whose coverage is smaller, rounds with fewer agents, and unmask requests that would
    leave fewer survivors (with coverage: senders of one of this agent's elements). Set it to the
    fleet size to allow only the sum over every agent."""
    colluders: int = 0
    """Agents that may collude with the aggregator: refuse rounds whose threshold t does not satisfy
    2t > k + 1 + colluders (k + 1 agents hold each agent's shares), under which the aggregator and
    the colluders could collect both of this agent's secrets. At most min_agents_per_sum - 2."""
    share_eval_losses: bool = True
    """Report each global version's eval loss on this cloud's held-out records (and their token
    count) to the aggregator, which ranks versions and stops early on them; false keeps them in
    this cloud (the agent's log and evals.jsonl). With ``[privacy.dp]`` they leave the cloud
    noised and accounted (``privacy.dp.eval_noise``)."""
    dp: DpConfig = field(default_factory=DpConfig)
    """Differential privacy of this cloud's records (``[privacy.dp]``)."""

    def refusal(self, federation: str, masked: bool, coverage: int) -> str | None:
        """Why a federation (masked or not, ``coverage`` agents an element, 0: all) breaks this
        policy, naming the fields; None if it does not. The agent and the aggregator both ask."""
        if not masked:
            if not self.require_masking:
                return None
            return (
                f"federation {federation!r} runs without secure aggregation, so its aggregator would see"
                " each agent's update; refused by privacy.require_masking (set it to false only to trust"
                " the aggregator)"
            )
        if coverage and coverage < self.min_agents_per_sum:
            return (
                f"federation {federation!r} sums each element over {coverage} agents (secagg.coverage),"
                f" fewer than privacy.min_agents_per_sum ({self.min_agents_per_sum})"
            )
        return None

    def validate(self) -> PrivacyConfig:
        """ConfigError naming the field."""
        if self.min_agents_per_sum < MIN_SENDERS:
            raise ConfigError(
                f"privacy.min_agents_per_sum must be at least {MIN_SENDERS}, got {self.min_agents_per_sum}"
                " (one agent's sum is its update)"
            )
        if not 0 <= self.colluders <= self.min_agents_per_sum - 2:
            raise ConfigError(
                f"privacy.colluders must be in 0..privacy.min_agents_per_sum - 2"
                f" ({self.min_agents_per_sum - 2}), got {self.colluders}: a sum over the colluders and"
                " this agent would be this agent's update"
            )
        self.dp.validate()
        return self


PRECISIONS = ("auto", "fp32", "bf16", "nf4")
"""An agent's base-model precisions (``AgentConfig.precision``)."""


def check_nf4_available() -> None:
    """ConfigError unless bitsandbytes, which loads a 4-bit base (``precision = "nf4"``), is
    installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("precision 'nf4' needs bitsandbytes: pip install 'cloudfed[qlora]'")


@dataclass(frozen=True)
class AgentConfig(MetricsTlsFields):
    """The agent daemon."""

    ENV_PREFIX: ClassVar[str] = "CLOUDFED_AGENT"

    aggregator: str = "localhost:7443"
    """host:port of the aggregator's mTLS API."""
    server_name: str = ""
    """TLS name to expect in the aggregator's certificate when dialing by IP ('' = host)."""
    state_dir: Path = Path("/var/lib/cloudfed-agent")
    """Where downloads, pending uploads and codec state live."""
    chunk_bytes: int = MAX_CHUNK_BYTES
    """Chunk size for uploads (4 KiB .. 1 MiB, at most the aggregator's limit)."""
    data: Path = Path("data")
    """Local training data: a .txt/.jsonl file or a directory of them (never leaves the cloud)."""
    eval_fraction: float = 0.1
    """Share of local documents held out for evaluation (split by a hash of each document)."""
    model: str = ""
    """Local path of the base model; '' uses the federation's model_id."""
    device: str = "auto"
    """Training device: 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    precision: str = "auto"
    """Base model weights: 'fp32', 'bf16', 'auto' (bf16 on a GPU that supports it, else fp32),
    or 'nf4' (QLoRA: the base's linear layers quantized to 4-bit NormalFloat as they load, with
    double quantization, and computed in bf16 on a GPU that supports it, else fp32; about 4.1
    bits a weight against bf16's 16; needs bitsandbytes, ``cloudfed[qlora]``). The LoRA
    adapter, its optimizer and every update stay float32."""
    cpu_threads: int = 0
    """torch CPU threads per rank; 0: $OMP_NUM_THREADS if set (torchrun sets 1 for several ranks),
    else the CPUs this process may use (its affinity and the cgroup CPU quota of a container or
    unit) divided among the torchrun ranks on this host."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass: 2.6-4.2x less accelerator
    memory at about a third less throughput (for models whose activations do not fit); with
    DP-SGD too (reentrant there, so that opacus sees the recomputed activations)."""
    loss_chunk_logits: int = 1 << 26
    """The most logits the loss holds at once: for the model types that allow it
    (``agent.causal_loss.HEAD_ONLY``: Llama, Mistral, Qwen, Gemma, ...) the LM head and the
    cross-entropy are taken a few positions at a time, and a frozen head keeps no logits for
    the backward. The default, 64 Mi (256 MiB in float32), takes 64 positions of 8 rows at a
    128k vocabulary; lower it where the head's logits still take too much accelerator memory.
    0: the model's own forward, with the whole batch's logits."""
    audit_dir: Path | None = None
    """If set, every update this agent sends is also written here, unmasked, with its metadata."""
    max_rounds: int = 0
    """Stop after evaluating this many new global versions (0: run until stopped)."""
    exit_when_finished: bool = True
    """When the aggregator says the federation is finished: exit 0 (systemd), or stay connected
    and idle, to train again if the federation is resumed (Kubernetes, where an exited container
    is restarted)."""
    metrics_listen: str = "0.0.0.0:9465"
    """host:port of the Prometheus /metrics endpoint ('' disables; rank 0 only under torchrun)."""
    health_listen: str = ""
    """host:port of a plaintext gRPC health service for probes ('' disables; rank 0 only)."""
    egress_price_per_gb: float = 0.0
    """Price of one GB leaving this cloud, for the estimated egress cost metric."""
    log_level: str = "INFO"
    """Python logging level."""
    log_format: str = "text"
    """``text`` (a line a record) or ``json`` (an object a line: time, level, logger, message)."""
    tls: AgentTlsConfig = field(default_factory=AgentTlsConfig)
    """mTLS material."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """What must hold before this agent sends an update (secure aggregation, sums, colluders)."""

    def validate(self) -> AgentConfig:
        """Check the agent config; raise ConfigError naming the field."""
        _check_hostport(self.aggregator, "aggregator")
        _check_log_format(self.log_format)
        try:
            validate_chunk_bytes(self.chunk_bytes, "chunk_bytes")
        except CloudfedError as exc:
            raise ConfigError(str(exc)) from exc
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.max_rounds < 0:
            raise ConfigError("max_rounds must be >= 0")
        if self.loss_chunk_logits < 0:
            raise ConfigError(f"loss_chunk_logits must be >= 0, got {self.loss_chunk_logits}")
        if self.metrics_listen:
            _check_hostport(self.metrics_listen, "metrics_listen")
            self.check_metrics_tls()
        _check_cpu_threads(self.cpu_threads)
        if self.health_listen:
            _check_hostport(self.health_listen, "health_listen")
        if self.egress_price_per_gb < 0:
            raise ConfigError("egress_price_per_gb must be >= 0")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected 'auto', 'fp32', 'bf16' or 'nf4', got {self.precision!r}")
        if self.precision == "nf4":
            check_nf4_available()
        self.privacy.validate()
        _check_tls(self.tls)
        self.tls.check_crl()
        return self


def _check_cpu_threads(value: int) -> None:
    if value < 0:
        raise ConfigError(f"cpu_threads must be >= 0 (0: automatic), got {value}")


def _check_log_format(value: str) -> None:
    if value not in LOG_FORMATS:
        raise ConfigError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {value!r}")


def _check_tls(tls: TlsConfig) -> None:
    """The TLS files exist, and the certificate and CA are valid now."""
    files = tls.files()
    files.check("tls")
    problem = Validity.of(files).problem()
    if problem is not None:
        raise ConfigError(problem)


def _check_hostport(value: str, name: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected host:port, got {value!r}")


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Coerce a TOML or env value to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table")
        return _build(tp, value, name + ".")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], name)
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list")
        return tuple(_convert(v, item, name) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    try:
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is Path:
            return Path(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported type {tp}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _env_overrides(
    cls: type, env: Mapping[str, str], prefix: str, path: tuple[str, ...] = ()
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = (*path, f.name)
        if dataclasses.is_dataclass(tp):
            sub = _env_overrides(tp, env, prefix, key)  # type: ignore[arg-type]
            if sub:
                out[f.name] = sub
            continue
        var = prefix + "_" + "_".join(key).upper()
        if var in env:
            out[f.name] = env[var]
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load(
    cls: type[T], path: Path | None, env: Mapping[str, str] | None = None, env_prefix: str | None = None
) -> T:
    """Load ``cls`` from a TOML file (optional) with env overrides; paths resolve against the file.

    Env vars are ``<prefix>_<FIELD PATH>``, the prefix being ``cls.ENV_PREFIX`` unless given.
    """
    prefix: str = env_prefix or str(getattr(cls, "ENV_PREFIX", "CLOUDFED"))
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    data = _merge(data, _env_overrides(cls, os.environ if env is None else env, prefix))
    config = _build(cls, data)
    if path is not None:
        config = _resolve_paths(config, Path(path).resolve().parent)
    return config


def _resolve_paths(obj: T, base: Path) -> T:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if isinstance(value, Path) and not value.is_absolute():
            changes[f.name] = base / value
        elif dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, base)
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]
