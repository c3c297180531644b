"""calibrate(): the paper's representation-drift rule on the real SmolLM2."""

from __future__ import annotations

import pytest

from tsa_patch.calibrate import CalibrationConfig, calibrate
from tsa_patch.calibration.data import load_documents, token_samples
from tsa_patch.calibration.drift import drift_rule_layers
from tsa_patch.errors import DataError, PolicyError

SMALL = CalibrationConfig(samples=2, seq_len=256, seed=3)


def test_drift_rule_picks_layers_at_or_below_the_quantile():
    drift = [5.0, 1.0, 2.0, 3.0, 4.0, 0.5]
    assert drift_rule_layers(drift, 0.5) == [1, 2, 5]
    assert drift_rule_layers(drift, 0.0) == [5]
    assert drift_rule_layers(drift, 1.0) == list(range(6))


def test_calibrate_is_deterministic_and_records_provenance(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    first = calibrate(model, tokenizer, SMALL, source_model="SmolLM2-135M-Instruct")
    second = calibrate(model, tokenizer, SMALL, source_model="SmolLM2-135M-Instruct")
    assert first.policy == second.policy
    policy = first.policy
    assert policy.num_layers == 30 and len(policy.sparse_layers) == 15  # delta = 0.5 of 30 layers
    assert all(policy.layers[i].tau == SMALL.tau for i in policy.sparse_layers)
    assert policy.source_model == "SmolLM2-135M-Instruct"
    assert policy.calibration["method"] == "representation-drift"
    assert policy.calibration["samples"] == 2 and policy.calibration["seed"] == 3
    assert len(first.drift) == 30 and min(first.drift) > 0
    # the chosen layers are exactly those with the smallest drift
    order = sorted(range(30), key=first.drift.__getitem__)
    assert sorted(order[:15]) == policy.sparse_layers


def test_samples_are_bounded_and_seeded(smollm2_fp32):
    _, tokenizer = smollm2_fp32
    docs = load_documents("kjv")
    a = token_samples(tokenizer, docs, 3, 128, seed=1)
    assert [len(s) for s in a] == [128] * 3
    assert a == token_samples(tokenizer, docs, 3, 128, seed=1)
    assert a != token_samples(tokenizer, docs, 3, 128, seed=2)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        ({"seq_len": 10**6}, DataError, "--seq-len must be between 1 and 8192"),
        ({"samples": 0}, DataError, "--samples must be at least 1"),
        ({"tau": 1.5}, PolicyError, "tau must be in"),
        ({"delta": 2.0}, PolicyError, "delta must be in"),
        ({"data": "/no/such/file.txt"}, DataError, "does not exist"),
        ({"data": "no-such-corpus"}, DataError, "not a corpus"),
        ({"samples": 10**4, "seq_len": 8192, "data": "paul-graham"}, DataError, "lower --samples"),
    ],
)
def test_bad_knobs_fail_before_measuring(smollm2_fp32, change, error, pattern):
    model, tokenizer = smollm2_fp32
    config = CalibrationConfig(**{**SMALL.__dict__, **change})
    with pytest.raises(error, match=pattern):
        calibrate(model, tokenizer, config)
