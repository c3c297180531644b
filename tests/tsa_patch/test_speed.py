"""calibrate's speed ladder (tsa_patch/calibration/speed.py): the lengths, the activation rule, and the timing of
every sparse layer at every length on a real model (on a CPU the times mean nothing; what they are made of does)."""

from __future__ import annotations

import pytest

from tsa_patch.calibration.speed import activation_from, ladder, layer_activations, measure_speed
from tsa_patch.data import load_documents
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy


def test_ladder_doubles_from_the_shortest_up_to_the_sequence_length():
    assert ladder(5000) == [1024, 2048, 4096, 5000]
    assert ladder(1024) == [1024]
    assert ladder(300, shortest=64) == [64, 128, 256, 300]


@pytest.mark.parametrize(("tsa_ms", "expected"), [
    ([2.0, 3.0, 3.0, 7.0], 4),      # faster from 4 on
    ([0.5, 3.0, 3.0, 7.0], 4),      # faster at 1 but slower at 2: never slower only from 4
    ([2.0, 3.0, 5.0, 9.0], None),   # slower at the longest length: TSA never pays
    ([1.0, 2.0, 4.0, 8.0], 1),      # a tie is not slower
])
def test_activation_is_the_shortest_length_from_which_tsa_is_never_slower(tsa_ms, expected):
    speed = {"lengths": [1, 2, 4, 8], "dense_ms": [1.0, 2.0, 4.0, 8.0], "tsa_ms": tsa_ms}
    assert activation_from(speed) == expected


def test_every_layer_engages_from_its_own_crossover():
    """A layer that pays from 4 engages from 4, one that pays at every length from 1, and one still slower at the
    longest length only beyond the calibrated length (8 + 1): none of them is ever slower than dense."""
    speed = {"lengths": [1, 2, 4, 8], "layers": {
        "3": {"dense_ms": [1.0, 2.0, 4.0, 8.0], "tsa_ms": [2.0, 3.0, 3.0, 7.0]},
        "5": {"dense_ms": [1.0, 2.0, 4.0, 8.0], "tsa_ms": [0.5, 1.0, 2.0, 4.0]},
        "7": {"dense_ms": [1.0, 2.0, 4.0, 8.0], "tsa_ms": [2.0, 3.0, 5.0, 9.0]}}}
    assert layer_activations(speed, 8) == {3: 4, 5: 1, 7: 9}


def test_every_sparse_layer_is_timed_at_every_length(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("\n\n".join(load_documents("paul-graham")[:3])).input_ids[:256]
    policy = TsaPolicy.uniform(30, 0.05, [3, 5], window=16, min_tokens=16, activation_length=4096)
    try:
        speed = measure_speed(model, ids, policy, [64, 128])
    finally:
        model.set_attn_implementation("sdpa")
        if hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
    assert speed["lengths"] == [64, 128] and set(speed["layers"]) == {"3", "5"}
    for times in speed["layers"].values():
        assert len(times["dense_ms"]) == len(times["tsa_ms"]) == 2
        assert all(t > 0 for t in times["dense_ms"] + times["tsa_ms"])
    for j in range(2):  # the ladder's totals are the layers' sums (rounded to 4 decimals)
        assert speed["tsa_ms"][j] == pytest.approx(sum(t["tsa_ms"][j] for t in speed["layers"].values()), abs=1e-3)
