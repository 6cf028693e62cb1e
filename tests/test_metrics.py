"""/metrics of both daemons, scraped over HTTP during a real round: byte counters match the truth."""

from __future__ import annotations

import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.demo import prepare
from common.bitpack import packed_bytes
from common.layout import ParamLayout
from common.secagg.params import SecAggParams
from common.secagg.ring import ring_bits
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
    rounds = 2  # agents stay up after their first upload, so each can be scraped at rest
    agg_config, agent_configs, health = prepare(tmp_path, rounds=rounds)
    agg_toml = tomllib.loads(agg_config.read_text())
    agg_listen = agg_toml["metrics_listen"]
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
                at_rest = value(samples, "cloudfed_agent_step", phase="upload") == 0
                if at_rest and value(samples, "cloudfed_agent_rounds_total") >= 1 and cloud not in last:
                    last[cloud] = samples  # an upload finished and none is in flight
                    texts[cloud] = RAW[listen]
            time.sleep(0.1)
        assert set(last) == set(agents), f"agents scraped at rest after an upload: {sorted(last)}"
        for proc in procs[1:]:  # agents stop by themselves after `rounds` new versions
            proc.wait(240)
        agg = scrape(agg_listen)
    finally:
        for proc in procs:
            stop(proc)
    store = CheckpointStore(tmp_path / "aggregator-state" / "checkpoints")
    numel = ParamLayout.from_tensors(store.load(0)).numel
    assert agg_toml["secagg"]["enabled"]  # masked uploads: ring_bits a coordinate, weight included
    bits = agg_toml["secagg"]["bits"]
    fp = SecAggParams.for_round(2, 0, 1.0, bits, len(agents)).fixed_point  # sized for those invited
    assert fp.coordinate_bits < ring_bits(bits, agg_toml["rounds"]["max_agents"])
    payload = packed_bytes(fp.masked_length(numel), fp.ring_bits)
    assert payload < numel * 4
    chunks = -(-payload // (1024 * 1024))
    for cloud, samples in last.items():
        uploads = value(samples, "cloudfed_agent_rounds_total")
        sent = value(samples, "cloudfed_transfer_bytes_total", direction="sent", kind="update")
        assert sent == payload * uploads, (cloud, sent, uploads, payload)
        received = value(
            agg, "cloudfed_transfer_bytes_total", direction="received", kind="update", cloud=cloud
        )
        assert received == payload * rounds, (cloud, received, payload)
        assert value(samples, "cloudfed_update_encoded_bytes_total") == payload * uploads
        assert value(samples, "cloudfed_update_raw_bytes_total") == numel * 4 * uploads
        assert any(n == "cloudfed_secagg_clipped_ratio" for n, _ in samples)  # set by every masked upload
        assert value(samples, "cloudfed_secagg_clipped_ratio") == 0.0  # the demo's clip spares all
        assert (
            value(samples, "cloudfed_transfer_bytes_total", direction="received", kind="model")
            >= store.manifest(0).size_bytes
        )
        assert value(samples, "cloudfed_agent_phase_seconds_count", phase="upload") == uploads
        # The agent's gRPC client metrics agree with what it uploaded.
        assert (
            value(samples, "grpc_client_handled_total", grpc_method="UploadUpdate", grpc_code="OK") == uploads
        )
        assert (
            value(samples, "grpc_client_msg_sent_total", grpc_method="UploadUpdate") == (chunks + 1) * uploads
        )
        assert value(samples, "grpc_client_msg_received_total", grpc_method="Join") == 1
        assert value(samples, "grpc_client_msg_received_total", grpc_method="DownloadModel") >= 2
        for direction in ("sent", "received"):  # Join, round events, status and eval reports
            control = value(samples, "cloudfed_transfer_bytes_total", direction=direction, kind="control")
            assert control > 0, (cloud, direction)
        assert value(samples, "cloudfed_transfer_bytes_total", cloud="") == 0  # every byte attributed
    for cloud in agents:
        for direction in ("received", "sent"):
            control = value(
                agg, "cloudfed_transfer_bytes_total", direction=direction, kind="control", cloud=cloud
            )
            assert control > 0, (cloud, direction)
    model_sent = value(agg, "cloudfed_transfer_bytes_total", direction="sent", kind="model")
    assert model_sent == sum(store.manifest(v).size_bytes for v in range(rounds + 1)) * len(agents)
    uploads_ok = value(agg, "grpc_server_handled_total", grpc_method="UploadUpdate", grpc_code="OK")
    assert uploads_ok == rounds * len(agents)
    assert value(agg, "grpc_server_msg_received_total", grpc_method="UploadUpdate") == (
        chunks + 1
    ) * rounds * len(agents)
    assert value(agg, "grpc_server_handled_total", grpc_method="Join", grpc_code="OK") == len(agents)
    assert value(agg, "cloudfed_round_phase_seconds_count", phase="aggregate") == rounds
    assert value(agg, "cloudfed_chunk_seconds_count", direction="received") == chunks * rounds * len(agents)
    assert value(agg, "cloudfed_rounds_total", outcome="completed") == rounds
    assert value(agg, "cloudfed_global_version") == rounds
    assert value(agg, "cloudfed_eval_loss") > 0
    assert not any(name.endswith("_created") for name, _ in agg)
    for name, text in [("aggregator", RAW[agg_listen]), *texts.items()]:
        lint = promtool("check", "metrics", stdin=text)
        assert lint.returncode == 0, (name, lint.stdout + lint.stderr)
