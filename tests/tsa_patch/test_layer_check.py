"""Each layer alone, end to end (tsa_patch/calibration/layer_check.py): the rescaling of the residual estimates
(test_calibrate.py checks a recorded layer-alone KL against an independent measurement on the real SmolLM2)."""

from __future__ import annotations

import math

import pytest

from tsa_patch.calibration.layer_check import REFERENCE_TAUS, _ratio_at, check_layers_end_to_end
from tsa_patch.calibration.measure import LayerMeasurement

TAUS = (0.001, 0.005, 0.01, 0.02, 0.1)


def test_the_ratio_is_exact_at_the_reference_taus_log_linear_between_and_constant_outside():
    ratios = {0.005: 2.0, 0.02: 8.0}
    assert _ratio_at(0.005, ratios) == 2.0 and _ratio_at(0.02, ratios) == 8.0
    assert _ratio_at(0.01, ratios) == pytest.approx(4.0)  # the geometric midpoint of 0.005 and 0.02
    assert _ratio_at(0.001, ratios) == 2.0 and _ratio_at(0.2, ratios) == 8.0
    assert _ratio_at(0.01, {0.005: 0.0, 0.02: 8.0}) == pytest.approx(4.0)  # linear where a ratio is 0
    assert _ratio_at(0.5, {0.02: 3.0}) == 3.0


def test_every_measured_layer_is_rescaled_by_its_own_end_to_end_kl():
    # two samples summed: mean errors 0.01, 0.02, 0.03, 0.04, 0.05 for layer 0; layer 1 never measured (a
    # sliding-window layer); layer 2 drops nothing at the first reference tau
    measured = LayerMeasurement(taus=TAUS, kept=[1.0] * 5, error=[0.02, 0.04, 0.06, 0.08, 0.10], samples=2)
    unmeasured = LayerMeasurement(taus=TAUS, kept=[0.0] * 5, error=[0.0] * 5)
    partial = LayerMeasurement(taus=TAUS, kept=[1.0] * 5, error=[0.0, 0.0, 0.01, 0.02, 0.03], samples=1)
    kl = {(0, 0.005): 0.2, (0, 0.02): 0.04, (2, 0.02): 0.002}
    calls = []

    def layer_kl(layer, tau):
        calls.append((layer, tau))
        return kl[layer, tau]

    records = check_layers_end_to_end([measured, unmeasured, partial], layer_kl)
    assert calls == [(0, 0.005), (0, 0.02), (2, 0.02)]  # nothing run where nothing is dropped or measured
    assert [r["ratio"] for r in records] == [10.0, 1.0, None, 0.1]
    ratio_at_001 = math.exp((math.log(10.0) + math.log(1.0)) / 2)  # 0.01 is the geometric midpoint
    expected = [0.01 * 10, 0.02 * 10, 0.03 * ratio_at_001, 0.04 * 1.0, 0.05 * 1.0]
    assert [measured.mean_error(i) for i in range(5)] == pytest.approx(expected)
    assert unmeasured.error == [0.0] * 5
    assert [partial.mean_error(i) for i in range(5)] == pytest.approx([0.0, 0.0, 0.001, 0.002, 0.003])
    assert set(REFERENCE_TAUS) <= set(TAUS)
