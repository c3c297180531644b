"""The end-to-end search of the predicted front and its held-out back-off, on synthetic fronts (no model)."""

from __future__ import annotations

from tsa_patch.calibration.budget import Budget
from tsa_patch.calibration.front import Candidate
from tsa_patch.calibration.search import DENSE_METRICS, MAX_BACKOFFS, RESOLUTION, back_off

# 50 policies from dense (index 0) to the sparsest: predicted error and savings grow along the front.
FRONT = [Candidate(taus=(i,), predicted_error=i / 1000, attention_removed=i / 60) for i in range(50)]
BUDGET = Budget("max_kl", 0.02)


def _metrics(kl: float) -> dict:
    return {"kl": kl, "top1_agreement": 1.0 - kl, "attention_cost": 1.0}


class Probe:
    """End-to-end KL as a power of the predicted error (held-out text harder than the calibration text, and
    superlinear, as measured on Qwen2.5-Coder-0.5B at 32K: 0.012 held-out at the chosen joint policy, 0.037 one
    point of predicted error 2x larger), counting what is measured."""

    def __init__(self, held_scale: float, held_power: float, calibration_scale: float = 0.5):
        self.held_scale, self.held_power, self.calibration_scale = held_scale, held_power, calibration_scale
        self.held, self.calibration = [], []

    def held_out(self, index: int) -> dict:
        self.held.append(index)
        return _metrics(self.held_kl(index))

    def held_kl(self, index: int) -> float:
        return self.held_scale * FRONT[index].predicted_error ** self.held_power

    def calibration_metrics(self, index: int) -> dict:
        self.calibration.append(index)
        return _metrics(self.calibration_scale * FRONT[index].predicted_error)


def test_a_policy_within_the_budget_on_held_out_samples_is_kept_after_one_evaluation():
    probe = Probe(held_scale=0.5, held_power=1.0)
    chosen, held, evaluations = back_off(FRONT, 30, BUDGET, probe.held_out, probe.calibration_metrics)
    assert chosen == 30 and held["kl"] == probe.held_kl(30) and probe.held == [30] and len(evaluations) == 1


def test_a_miss_is_refined_between_the_last_pass_and_the_last_miss():
    # held-out KL = 11.5 e^1.73, the fit through the two held-out points of the joint calibration of
    # Qwen2.5-Coder-0.5B at 32K (e 0.0185 -> 0.0116, e 0.0364 -> 0.0373): the budget 0.02 holds up to e = 0.0254,
    # front index 25. The search's choice, 36, measures 0.037; shrinking its predicted error once by that miss
    # (the earlier rule, and this search's first step) lands at index 19.
    probe = Probe(held_scale=11.5, held_power=1.73)
    chosen, held, evaluations = back_off(FRONT, 36, BUDGET, probe.held_out, probe.calibration_metrics)
    best = max(i for i in range(50) if probe.held_kl(i) <= 0.02)
    assert best == 25 and probe.held[:2] == [36, 19]
    assert held["kl"] <= 0.02 and held["kl"] == probe.held_kl(chosen)
    assert chosen > 19 and FRONT[best].attention_removed - FRONT[chosen].attention_removed < RESOLUTION
    assert all(probe.held_kl(i) > 0.02 for i in probe.held if i > chosen)  # every sparser one measured misses
    assert len(probe.held) <= 1 + MAX_BACKOFFS and [e["index"] for e in evaluations] == probe.held
    assert chosen in probe.calibration  # a pass on held-out text is checked on the calibration samples too


def test_a_policy_that_misses_on_the_calibration_samples_is_not_chosen():
    # as above, but index 25, the sparsest within the budget on held-out text, misses it on the calibration samples
    probe = Probe(held_scale=11.5, held_power=1.73)

    def calibration(index: int) -> dict:
        return _metrics(1.0) if index == 25 else probe.calibration_metrics(index)

    chosen, held, _ = back_off(FRONT, 36, BUDGET, probe.held_out, calibration)
    assert 25 in probe.held and 19 <= chosen < 25 and held["kl"] <= 0.02


def test_dense_when_nothing_sparser_passes():
    probe = Probe(held_scale=1e6, held_power=1.0)  # every policy but dense misses by far
    chosen, held, evaluations = back_off(FRONT, 40, BUDGET, probe.held_out, probe.calibration_metrics)
    assert (chosen, held) == (0, DENSE_METRICS) and len(evaluations) <= 1 + MAX_BACKOFFS
    assert 0 not in probe.held  # the dense policy needs no measurement


def test_an_agreement_budget_backs_off_by_bisection():
    probe = Probe(held_scale=20.0, held_power=1.0)  # top-1 agreement 1 - 20 e: 0.9 holds up to index 5
    chosen, held, _ = back_off(FRONT, 40, Budget("min_agreement", 0.9), probe.held_out, probe.calibration_metrics)
    assert held["top1_agreement"] >= 0.9 and probe.held == [40, 20, 10, 5] and chosen == 5
