"""calibrate's speed ladder (tsa_patch/calibration/speed.py): the lengths, the activation rule, and the timing of
every sparse layer at every length on a real model (on a CPU the times mean nothing; what they are made of does)."""

from __future__ import annotations

import dataclasses

import pytest

from tsa_patch.calibration.measure import LayerMeasurement
from tsa_patch.calibration.speed import (TimeModel, activation_from, cost_points, fit_time_model, ladder,
                                         layer_activations, measure_speed, prefill_floor, pricing_policies,
                                         time_models, time_prefills)
from tsa_patch.data import load_documents
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy


def test_ladder_doubles_from_the_shortest_up_to_the_sequence_length():
    assert ladder(5000) == [1024, 2048, 4096, 5000]
    assert ladder(1024) == [1024]
    assert ladder(300, shortest=64) == [64, 128, 256, 300]


def test_ladder_takes_the_midpoints_where_layers_cross_over():
    assert ladder(32000) == [1024, 2048, 4096, 8192, 12288, 16384, 24576, 32000]
    assert ladder(13000) == [1024, 2048, 4096, 8192, 12288, 13000]
    assert ladder(12288) == [1024, 2048, 4096, 8192, 12288]


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


def test_device_times_decide_where_they_were_measured():
    """On CUDA a layer's rule reads its device time (the GPU busy ahead of it), not its time alone."""
    alone_slower = {"dense_ms": [1.0, 2.0], "tsa_ms": [3.0, 4.0], "dense_busy_ms": [1.0, 2.0],
                    "tsa_busy_ms": [1.5, 1.0]}
    assert layer_activations({"lengths": [1, 2], "layers": {"4": alone_slower}}, 2) == {4: 2}


@pytest.mark.parametrize(("policy_ms", "expected"), [
    ([None, 2.5, 3.0, 7.0], 4),      # slower at 2: every layer from 4 at least
    ([None, 1.9, 3.9, 7.8], None),   # at least MIN_PREFILL_GAIN (2 %) faster everywhere
    ([None, 2.5, 3.9, 8.5], 9),      # slower at the longest length: beyond the calibrated length
    ([0.9, 2.5, 3.9, 7.8], 4),       # the longest slower length counts
    ([None, 1.99, 3.9, 7.8], 4),     # 0.5 % faster at 2 is within timing scatter: counts as slower
])
def test_the_whole_model_check_raises_every_layer_past_a_length_it_does_not_pay(policy_ms, expected):
    dense_ms = [None if policy_ms[0] is None else 1.0, 2.0, 4.0, 8.0]  # None: no layer engages at that length
    prefills = {"lengths": [1, 2, 4, 8], "dense_ms": dense_ms, "policy_ms": policy_ms}
    assert prefill_floor(prefills, 8) == expected


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
        assert len(times["dense_ms"]) == len(times["tsa_ms"]) == len(times["attention_cost"]) == 2
        assert all(0.0 < cost <= 1.0 for cost in times["attention_cost"])
        assert all(t > 0 for t in times["dense_ms"] + times["tsa_ms"])
    for j in range(2):  # the ladder's totals are the layers' sums (rounded to 4 decimals)
        assert speed["tsa_ms"][j] == pytest.approx(sum(t["tsa_ms"][j] for t in speed["layers"].values()), abs=1e-3)


def test_the_whole_prefill_is_timed_where_a_layer_engages(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("\n\n".join(load_documents("paul-graham")[:3])).input_ids[:256]
    policy = TsaPolicy.uniform(30, 0.05, [3], window=16, min_tokens=16, activation_length=128)
    try:
        prefills = time_prefills(model, ids, policy, [64, 128], rounds=1)
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, CONFIG_KEY)
    assert prefills["dense_ms"][0] is None and prefills["policy_ms"][0] is None  # no layer engages at 64
    assert prefills["dense_ms"][1] > 0 and prefills["policy_ms"][1] > 0


def test_the_time_model_is_the_least_squares_line_through_the_points():
    points = [{"cost": c, "ratio": 0.2 + 1.9 * c + noise} for c, noise in ((0.1, 0.01), (0.3, -0.02), (0.7, 0.01))]
    fitted = fit_time_model(points)
    # least squares through three points with residuals of 0.01-0.02: the exact line is 0.2 + 1.9 x cost
    assert fitted.per_cost == pytest.approx(1.9, abs=0.05) and fitted.overhead == pytest.approx(0.2, abs=0.03)
    assert fitted.points == 3 and fitted.break_even() == pytest.approx((1 - fitted.overhead) / fitted.per_cost)
    assert TimeModel(0.2, 2.0, 2).time_saved(0.1) == pytest.approx(0.6)
    assert TimeModel(0.2, 2.0, 2).time_saved(0.5) == 0.0  # slower than dense saves nothing
    assert TimeModel(1.1, 2.0, 2).break_even() == 0.0  # slower than dense even computing nothing: never faster


@pytest.mark.parametrize("points", [
    [{"cost": 0.3, "ratio": 0.8}],  # a single point
    [{"cost": 0.30, "ratio": 0.8}, {"cost": 0.32, "ratio": 0.9}],  # too close for a slope
    [{"cost": 0.1, "ratio": 0.9}, {"cost": 0.7, "ratio": 0.5}],  # more work in less time: noise, not a model
])
def test_no_time_model_without_points_that_determine_one(points):
    assert fit_time_model(points) is None


def test_every_sparse_layer_gives_a_cost_point(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("\n\n".join(load_documents("paul-graham")[:3])).input_ids[:256]
    policy = TsaPolicy.uniform(30, 0.2, [3, 5], window=16, min_tokens=16, activation_length=4096)
    try:
        points = cost_points(model, ids, policy, 128)
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, CONFIG_KEY)
    assert [p["layer"] for p in points] == [3, 5]
    for point in points:
        assert point["path"] == "tsa" and point["tau"] == 0.2 and point["ratio"] > 0
        assert 0.0 < point["cost"] < 1.0  # tau 0.2 drops tokens at 128 tokens with a 16-token window


def test_the_front_is_priced_from_every_measured_layer_at_both_ends_of_the_grid(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer("\n\n".join(load_documents("paul-graham")[:3])).input_ids[:256]
    taus = (0.001, 0.05, 0.2)
    measurements = [LayerMeasurement(taus=taus, kept=[0.0] * 3, error=[0.0] * 3, samples=int(i in (2, 4)))
                    for i in range(30)]
    measurements[4].block_saving, measurements[4].block_error = 0.3, 0.001  # layer 4's block-sparse option measured

    def make_policy(layer_taus, blocks):
        policy = TsaPolicy.uniform(30, 0.0, [], window=16, min_tokens=16, activation_length=4096)
        layers = [dataclasses.replace(layer, enabled=tau > 0, tau=tau, kernel="block_sparse" if i in blocks
                                      else "dense") for i, (layer, tau) in enumerate(zip(policy.layers, layer_taus))]
        return dataclasses.replace(policy, layers=tuple(layers))

    steps = []
    try:
        models, points = time_models(model, ids, pricing_policies(measurements, make_policy), 128,
                                     lambda: steps.append(1))
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, CONFIG_KEY)
    assert len(steps) == 3  # lowest tau, highest tau, the block-sparse kernel
    assert [(p["layer"], p["tau"], p["path"]) for p in points] == [(2, 0.001, "tsa"), (4, 0.001, "tsa"),
                                                                   (2, 0.2, "tsa"), (4, 0.2, "tsa"),
                                                                   (4, 0.0, "block_sparse")]
    for layer in (2, 4):  # a higher tau never computes more
        low, high = (p["cost"] for p in points if p["layer"] == layer and p["path"] == "tsa")
        assert high <= low
    assert all(p["ratio"] > 0 for p in points)
    # CPU wall-clock times need not give a line (a fit needs a positive slope): whatever was fitted is valid
    assert set(models) <= {"tsa"} and all(m.per_cost > 0 and m.points == 4 for m in models.values())
