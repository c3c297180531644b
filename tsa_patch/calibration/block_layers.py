"""Which layers also get the block-sparse kernel: as many as the budget allows, lowest representation drift first."""

from __future__ import annotations

from collections.abc import Callable

from tsa_patch.calibration.budget import Budget
from tsa_patch.calibration.search import MAX_BACKOFFS, MAX_SEARCH_EVALUATIONS, bisect


def choose_block_sparse(taus, drift: list[float], windowed: set[int], measure: Callable[..., dict], budget: Budget,
                        start: Callable, baseline: dict) -> tuple[list[int], dict]:
    """The most layers (lowest drift first) that can also run the block-sparse kernel within ``budget``.

    Bisection on the count with end-to-end measurements (``measure(taus, which, block_layers)``) of the calibration
    samples, then a held-out check that halves the count until it passes (at most ``MAX_BACKOFFS`` times).
    ``baseline`` holds the TSA policy's own calibration and held-out metrics (no block-sparse layer), which are not
    measured again. Returns the layers and a report.
    """
    order = [i for i in sorted(range(len(drift)), key=lambda i: drift[i]) if i not in windowed]
    evaluations: dict[int, dict] = {}

    def measured(count: int) -> dict:
        if count not in evaluations:
            evaluations[count] = measure(taus, "calibration", set(order[:count]))
        return evaluations[count]

    step = start(f"Adding the block-sparse kernel to up to {len(order)} layers", MAX_SEARCH_EVALUATIONS)
    count = bisect(len(order) + 1, lambda n: n == 0 or budget.met(measured(n)), step)

    def held_out(count: int) -> dict:
        return measure(taus, "held_out", set(order[:count])) if count else baseline["held_out"]

    held = held_out(count)
    backoffs = 0
    while count and not budget.met(held, held_out=True) and backoffs < MAX_BACKOFFS:
        count, backoffs = count // 2, backoffs + 1
        held = held_out(count)
    layers = sorted(order[:count])
    report = {"order": order, "layers": layers, "held_out": held, "held_out_backoffs": backoffs,
              "calibration": measured(count) if count else baseline["calibration"],
              "evaluations": [{"layers": n, **{k: e[k] for k in ("kl", "top1_agreement", "attention_cost")}}
                              for n, e in sorted(evaluations.items())]}
    return layers, report
