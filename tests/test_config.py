"""Configuration loading: the shipped example, env overrides, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import AgentConfig, AggregatorConfig, load
from common.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "config" / "aggregator.example.toml"


def test_shipped_example_loads_and_validates_except_for_its_certificate_paths() -> None:
    config = load(AggregatorConfig, EXAMPLE, env={})
    assert config.rounds.min_agents == 3
    assert config.federation.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(ConfigError, match=r"^tls\.cert: file not found"):
        config.validate()


def test_env_overrides_nested_fields_and_lists() -> None:
    env = {
        "CLOUDFED_ROUNDS_MIN_AGENTS": "2",
        "CLOUDFED_ALLOWED_AGENTS": "spiffe://t/a, spiffe://t/b",
        "CLOUDFED_ENABLE_REFLECTION": "yes",
    }
    config = load(AggregatorConfig, EXAMPLE, env=env)
    assert config.rounds.min_agents == 2
    assert config.allowed_agents == ("spiffe://t/a", "spiffe://t/b")
    assert config.enable_reflection is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLOUDFED_ROUNDS_MIN_AGENTS": "1.5"}, "rounds.min_agents: expected int"),
        ({"CLOUDFED_ENABLE_CHANNELZ": "maybe"}, "enable_channelz: expected true or false"),
        ({"CLOUDFED_LIMITS_MAX_CHUNK_BYTES": str(2 * 1024 * 1024)}, "limits.max_chunk_bytes must be between"),
        ({"CLOUDFED_LISTEN": "nohost"}, "listen: expected host:port"),
        ({"CLOUDFED_TRUST_DOMAIN": "Bad_Domain"}, "trust_domain: bad trust domain"),
        ({"CLOUDFED_LOG_FORMAT": "xml"}, "log_format: expected one of text, json, got 'xml'"),
    ],
)
def test_bad_values_name_their_field(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(AggregatorConfig, EXAMPLE, env=env).validate()


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('aggregator = "agg.example:7443"\nstate_dir = "state"\n[tls]\ncert = "t/a.pem"\n')
    config = load(AgentConfig, path, env={})
    assert config.state_dir == tmp_path / "state"
    assert config.tls.cert == tmp_path / "t" / "a.pem"
    with pytest.raises(ConfigError, match="config file not found"):
        load(AgentConfig, tmp_path / "missing.toml", env={})


def test_shipped_agent_example_loads() -> None:
    config = load(
        AgentConfig, REPO / "deploy" / "config" / "agent.example.toml", env={"CLOUDFED_AGENT_DEVICE": "cpu"}
    )
    assert config.device == "cpu"
    assert config.audit_dir is None
    with pytest.raises(ConfigError, match=r"^tls\.cert: file not found"):
        config.validate()
    with pytest.raises(ConfigError, match="eval_fraction must be between 0 and 1"):
        load(AgentConfig, None, env={"CLOUDFED_AGENT_EVAL_FRACTION": "1.5"}).validate()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLOUDFED_AGENT_DEVICE": "gpu"}, r"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ({"CLOUDFED_AGENT_DEVICE": "cuda:x"}, r"device: expected .* got 'cuda:x'"),
        (
            {"CLOUDFED_AGENT_PRECISION": "fp16"},
            r"precision: expected 'auto', 'fp32', 'bf16' or 'nf4', got 'fp16'",
        ),
    ],
)
def test_agent_device_and_precision_are_checked_before_the_tls_files(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(AgentConfig, None, env=env).validate()
    assert load(AgentConfig, None, env={"CLOUDFED_AGENT_DEVICE": "cuda:1"}).device == "cuda:1"
    assert load(
        AgentConfig, None, env={"CLOUDFED_AGENT_ACTIVATION_CHECKPOINTING": "true"}
    ).activation_checkpointing
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load(AgentConfig, None, env={"CLOUDFED_AGENT_ACTIVATION_CHECKPOINTING": "maybe"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CLOUDFED_SECAGG_ADAPTIVE_CLIP": "-1"}, r"secagg.adaptive_clip must be >= 0"),
        ({"CLOUDFED_SECAGG_ADAPTIVE_CLIP": "nan"}, r"secagg.adaptive_clip must be >= 0"),
        ({"CLOUDFED_SECAGG_CLIP_SEGMENT": "0"}, r"secagg.clip_segment must be >= 1"),
        ({"CLOUDFED_FEDERATION_CODEC_SEGMENT": "-1"}, r"federation.codec_segment must be >= 0"),
    ],
)
def test_bad_clip_and_segment_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(AggregatorConfig, EXAMPLE, env=env).validate()


@pytest.mark.parametrize("config_class", [AggregatorConfig, AgentConfig])
def test_metrics_tls_files_are_checked_at_start(config_class: type, pki, tmp_path: Path) -> None:
    """Half a TLS setting used to serve plain HTTP without a word; now each mistake is named."""
    d = pki.dir
    cert, key, ca = d.cert("aggregator"), d.key("aggregator"), d.ca_cert
    other_key = pki.agent("scraper", cloud="ops").key

    def check(**fields: object) -> None:
        config_class(metrics_listen="127.0.0.1:0", **fields).check_metrics_tls()

    check()  # plain HTTP
    check(metrics_cert=cert, metrics_key=key, metrics_client_ca=ca)
    assert config_class(metrics_cert=cert, metrics_key=key).metrics_tls().client_ca is None
    cases = [
        ({"metrics_cert": cert}, "metrics_cert and metrics_key: set both"),
        ({"metrics_key": key}, "metrics_cert and metrics_key: set both"),
        ({"metrics_client_ca": ca}, "metrics_client_ca: client certificates need TLS"),
        ({"metrics_cert": tmp_path / "gone.pem", "metrics_key": key}, "metrics_cert: file not found"),
        ({"metrics_cert": cert, "metrics_key": other_key}, "unusable for TLS"),
        ({"metrics_cert": cert, "metrics_key": key, "metrics_client_ca": key}, "unusable for TLS"),
    ]
    for fields, message in cases:
        with pytest.raises(ConfigError, match=message):
            check(**fields)
