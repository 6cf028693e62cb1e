"""bench.quality's summary: compression, gaps and the bytes to the baseline's final loss + 0.1."""

from __future__ import annotations

import pytest

from bench.quality import SCHEMES, markdown, summarise

BASELINE = SCHEMES[0].label


def _run(losses: list[float], sent: list[float]) -> dict[str, list[float]]:
    return {"eval_loss": losses, "uplink_bytes": sent, "cosine": [1.0] * (len(losses) - 1)}


def test_bytes_to_the_target_against_the_baseline() -> None:
    results = {
        BASELINE: [_run([6.0, 5.5, 5.0], [0, 100, 200])],  # target 5.1, reached with 200 bytes
        "cheap": [_run([6.0, 5.05, 5.04], [0, 10, 20])],  # reached with 10: 20x fewer
        "short": [_run([6.0, 5.3, 5.2], [0, 5, 10])],  # never within 0.1
    }
    summary = summarise(results)
    assert summary["cheap"]["compression"] == 10.0
    assert summary["cheap"]["loss_gap_nats"] == pytest.approx(0.04)
    assert summary["cheap"]["bytes_to_target"] == 10
    assert summary["cheap"]["bytes_saving_to_target"] == 20.0
    assert summary["short"]["bytes_to_target"] is None
    assert summary["short"]["bytes_saving_to_target"] is None
    table = markdown(summary, rounds=2, seeds=1)
    cheap = "| cheap | 10.0x | 5.040 | +0.040 | +0.040 (+0.040 to +0.040) | 0.00 MB (20.0x fewer) | 1.000 |"
    assert cheap in table
    assert "| short | 20.0x | 5.200 | +0.200 | +0.200 (+0.200 to +0.200) | not reached | 1.000 |" in table


def test_each_seed_is_compared_with_the_baseline_run_of_the_same_seed() -> None:
    results = {
        BASELINE: [_run([6.0, 5.0], [0, 9]), _run([6.0, 5.4], [0, 9]), _run([6.0, 5.2], [0, 9])],
        "coded": [_run([6.0, 5.1], [0, 3]), _run([6.0, 5.3], [0, 3]), _run([6.0, 5.25], [0, 3])],
    }
    summary = summarise(results)["coded"]
    assert summary["loss_gap_nats"] == pytest.approx(0.05)  # median 5.25 against median 5.2
    assert summary["seed_gap_median"] == pytest.approx(0.05)  # +0.1, -0.1, +0.05
    assert summary["seed_gap_min"] == pytest.approx(-0.1)
    assert summary["seed_gap_max"] == pytest.approx(0.1)
    assert summary["bytes_to_target"] == 3  # every seed within 5.3, but one baseline seed is not
    assert summary["bytes_saving_to_target"] is None
    table = markdown(summarise(results), rounds=1, seeds=3)
    assert "| +0.050 (-0.100 to +0.100) | 0.00 MB (not every baseline seed reaches it) |" in table


def test_a_base_already_within_the_target_has_no_saving_to_divide() -> None:
    results = {
        BASELINE: [_run([5.05, 5.02, 5.0], [0, 100, 200])],  # round 0 is within 0.1 of the end
        "coded": [_run([5.05, 5.04, 5.03], [0, 10, 20])],
    }
    summary = summarise(results)
    assert summary["coded"]["bytes_to_target"] == 0
    assert summary["coded"]["bytes_saving_to_target"] is None
    table = markdown(summary, rounds=2, seeds=1, base="the base pretrained 100 steps")
    assert "| 0 MB (the base is within 0.1 already) |" in table
    assert "LoRA rank 8; the base pretrained 100 steps; `python -m bench.quality`." in table
