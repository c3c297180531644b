"""The held-out back-off of the calibration search, on a synthetic front (no model)."""

from __future__ import annotations

from tsa_patch.calibration.budget import Budget
from tsa_patch.calibration.front import Candidate
from tsa_patch.calibration.search import MAX_BACKOFFS, back_off

# 50 policies from dense (index 0) to the sparsest: predicted error and savings grow along the front.
FRONT = [Candidate(taus=(i,), predicted_error=i / 1000, attention_removed=i / 60) for i in range(50)]
BUDGET = Budget("max_kl", 0.02)


class HeldOut:
    """Held-out KL as a power of the predicted error, recording what is measured."""

    def __init__(self, scale: float, power: float):
        self.scale, self.power, self.measured = scale, power, []

    def kl(self, index: int) -> float:
        return self.scale * FRONT[index].predicted_error ** self.power

    def __call__(self, index: int) -> dict:
        self.measured.append(index)
        kl = self.kl(index)
        return {"kl": kl, "top1_agreement": 1.0 - kl, "attention_cost": 1.0 - FRONT[index].attention_removed}


def test_a_policy_within_the_budget_on_held_out_samples_is_kept_after_one_evaluation():
    held_out = HeldOut(scale=0.5, power=1.0)
    chosen, held, evaluations = back_off(FRONT, 30, BUDGET, held_out)
    assert (chosen, held["kl"], held_out.measured) == (30, held_out.kl(30), [30]) and len(evaluations) == 1


def test_a_miss_shrinks_the_predicted_error_by_the_miss():
    # held-out KL = 11.5 e^1.73, the fit through the two held-out points of the joint calibration of
    # Qwen2.5-Coder-0.5B at 32K (e 0.0185 -> 0.0116, e 0.0364 -> 0.0373). The search's choice, 36, measures
    # 0.0366: 1.83x the budget, so the back-off moves to predicted error 0.036 / 1.83, index 19, and stops there
    # (0.0121: superlinear KL leaves room to spare).
    held_out = HeldOut(scale=11.5, power=1.73)
    chosen, held, evaluations = back_off(FRONT, 36, BUDGET, held_out)
    assert held_out.measured == [36, 19] and chosen == 19
    assert held["kl"] == held_out.kl(19) <= 0.02 < held_out.kl(36)
    assert [e["index"] for e in evaluations] == [36, 19]
    assert [e["attention_removed"] for e in evaluations] == [round(36 / 60, 4), round(19 / 60, 4)]


def test_the_back_off_stops_after_its_steps_and_reports_the_miss():
    held_out = HeldOut(scale=0.05, power=0.0)  # KL 0.05 in every policy: 2.5x the budget at every step
    chosen, held, evaluations = back_off(FRONT, 40, BUDGET, held_out)
    assert held_out.measured == [40, 16, 6, 2] and len(evaluations) == 1 + MAX_BACKOFFS and chosen == 2
    assert not BUDGET.met(held, held_out=True)  # calibrate reports it (meets_budget_held_out)


def test_a_miss_far_beyond_the_budget_goes_back_to_dense():
    held_out = HeldOut(scale=1e6, power=1.0)
    chosen, held, _ = back_off(FRONT, 40, BUDGET, held_out)
    assert held_out.measured == [40, 0] and chosen == 0 and held["kl"] == 0.0


def test_an_agreement_budget_halves_the_predicted_error_per_miss():
    held_out = HeldOut(scale=20.0, power=1.0)  # top-1 agreement 1 - 20 e: 0.9 holds up to index 5
    chosen, held, _ = back_off(FRONT, 40, Budget("min_agreement", 0.9), held_out)
    assert held_out.measured == [40, 20, 10, 5] and chosen == 5 and held["top1_agreement"] >= 0.9


def test_a_speed_target_has_no_back_off():
    held_out = HeldOut(scale=1e6, power=1.0)
    chosen, _, evaluations = back_off(FRONT, 40, Budget("target_speedup", 1.5), held_out)
    assert chosen == 40 and len(evaluations) == 1
