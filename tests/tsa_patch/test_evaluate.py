"""paired_comparison: the per-sample statistics `tsa-patch eval` reports next to the mean delta."""

from __future__ import annotations

import random
import statistics

import pytest

from tsa_patch.evaluate import paired_comparison


def test_paired_comparison_counts_and_interval():
    rng = random.Random(7)
    scores = [(rng.choice([0.0, 0.5, 1.0]), rng.choice([0.0, 0.5, 1.0])) for _ in range(50)]
    deltas = [t - d for d, t in scores]
    paired = paired_comparison(scores)
    assert paired["samples"] == 50
    assert paired["tsa_better"] == sum(d > 0 for d in deltas) and paired["tsa_worse"] == sum(d < 0 for d in deltas)
    assert paired["mean_delta"] == pytest.approx(statistics.mean(deltas), rel=1e-12)
    half_width = 1.96 * statistics.stdev(deltas) / 50**0.5
    low, high = paired["ci95"]
    assert low == pytest.approx(statistics.mean(deltas) - half_width, rel=1e-9)
    assert high == pytest.approx(statistics.mean(deltas) + half_width, rel=1e-9)


def test_paired_comparison_of_identical_scores_and_of_one_sample():
    assert paired_comparison([(1.0, 1.0), (0.5, 0.5)]) == {"samples": 2, "tsa_better": 0, "tsa_worse": 0,
                                                           "mean_delta": 0.0, "ci95": [0.0, 0.0]}
    assert paired_comparison([(0.0, 1.0)])["ci95"] is None
