"""/metrics of both daemons, scraped over HTTP during a real round: byte counters match the truth."""

from __future__ import annotations

import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.demo import prepare
from common.layout import ParamLayout
from server.checkpoints import CheckpointStore
from tests.daemons import start, stop, wait_serving
from tests.promtool import promtool

pytestmark = pytest.mark.slow


RAW: dict[str, str] = {}


def scrape(listen: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} from a /metrics endpoint (the text is kept in RAW)."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    RAW[listen] = text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_byte_counters_match_what_was_sent_and_histograms_count_the_round(tmp_path: Path) -> None:
    agg_config, agent_configs, health = prepare(tmp_path, rounds=1)
    agg_listen = tomllib.loads(agg_config.read_text())["metrics_listen"]
    agents = {
        c.parent.name.split("-")[0]: tomllib.loads(c.read_text())["metrics_listen"] for c in agent_configs
    }
    procs = [start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log")]
    last: dict[str, dict] = {}
    texts: dict[str, str] = {}
    try:
        wait_serving(health, timeout=120)
        procs += [
            start("agent.cli", "--config", str(c), "run", log=c.parent / "agent.log") for c in agent_configs
        ]
        deadline = time.monotonic() + 240
        while len(last) < len(agents) and time.monotonic() < deadline:
            for cloud, listen in agents.items():
                try:
                    samples = scrape(listen)
                except OSError:
                    continue
                if value(samples, "cloudfed_agent_rounds_total") >= 1 and cloud not in last:
                    last[cloud] = samples  # uploaded; this agent sends no more updates
                    texts[cloud] = RAW[listen]
            time.sleep(0.1)
        assert set(last) == set(agents), f"agents scraped after their upload: {sorted(last)}"
        store = CheckpointStore(tmp_path / "aggregator-state" / "checkpoints")
        while 1 not in store.versions() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        agg = scrape(agg_listen)
    finally:
        for proc in procs:
            stop(proc)
    payload = (ParamLayout.from_tensors(store.load(0)).numel + 1) * 4
    for cloud, samples in last.items():
        sent = value(samples, "cloudfed_transfer_bytes_total", direction="sent", kind="update")
        received = value(
            agg, "cloudfed_transfer_bytes_total", direction="received", kind="update", cloud=cloud
        )
        assert sent == received == payload, (cloud, sent, received, payload)
        assert value(samples, "cloudfed_update_encoded_bytes_total") == payload
        assert value(samples, "cloudfed_update_raw_bytes_total") == payload - 4
        # The model: version 0 before training (downloaded once, cached), as the aggregator counted it.
        got_model = value(samples, "cloudfed_transfer_bytes_total", direction="received", kind="model")
        assert got_model >= store.manifest(0).size_bytes
        assert value(samples, "cloudfed_agent_phase_seconds_count", phase="train") == 1
        assert value(samples, "cloudfed_agent_phase_seconds_count", phase="upload") == 1
        # The agent's gRPC client metrics: one upload call, header + chunks sent; Join answered once.
        chunks = -(-payload // (1024 * 1024))
        assert value(samples, "grpc_client_handled_total", grpc_method="UploadUpdate", grpc_code="OK") == 1
        assert value(samples, "grpc_client_msg_sent_total", grpc_method="UploadUpdate") == chunks + 1
        assert value(samples, "grpc_client_msg_received_total", grpc_method="Join") == 1
        assert value(samples, "grpc_client_msg_received_total", grpc_method="DownloadModel") >= 2
        assert value(samples, "grpc_client_handling_seconds_count", grpc_method="GetUploadStatus") >= 1
    for cloud in agents:  # control traffic (Join, round events, reports) is attributed to each cloud
        for direction in ("received", "sent"):
            control = value(
                agg, "cloudfed_transfer_bytes_total", direction=direction, kind="control", cloud=cloud
            )
            assert control > 0, (cloud, direction)
    model_sent = value(agg, "cloudfed_transfer_bytes_total", direction="sent", kind="model")
    assert model_sent == sum(store.manifest(v).size_bytes for v in (0, 1)) * len(agents)
    assert value(agg, "grpc_server_handled_total", grpc_method="UploadUpdate", grpc_code="OK") == len(agents)
    assert value(agg, "grpc_server_msg_received_total", grpc_method="UploadUpdate") >= 2 * len(agents)
    assert value(agg, "grpc_server_handled_total", grpc_method="Join", grpc_code="OK") == len(agents)
    assert value(agg, "cloudfed_round_phase_seconds_count", phase="upload") >= 1
    assert value(agg, "cloudfed_round_phase_seconds_count", phase="aggregate") == 1
    assert value(agg, "cloudfed_chunk_seconds_count", direction="received") >= len(agents)
    assert value(agg, "cloudfed_rounds_total", outcome="completed") == 1
    assert value(agg, "cloudfed_global_version") == 1
    assert value(agg, "cloudfed_eval_loss") > 0
    assert not any(name.endswith("_created") for name, _ in agg)
    for name, text in [("aggregator", RAW[agg_listen]), *texts.items()]:
        lint = promtool("check", "metrics", stdin=text)
        assert lint.returncode == 0, (name, lint.stdout + lint.stderr)
