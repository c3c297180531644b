"""Which layers also get the block-sparse kernel: as many as the budget allows, lowest representation drift first."""

from __future__ import annotations

from collections.abc import Callable

from tsa_patch.calibration.budget import Budget
from tsa_patch.calibration.search import MAX_SEARCH_EVALUATIONS, bisect


def choose_block_sparse(taus, drift: list[float], windowed: set[int], measure: Callable[..., dict], budget: Budget,
                        start: Callable, baseline: dict) -> tuple[list[int], dict]:
    """The most layers (lowest drift first) that can also run the block-sparse kernel within ``budget``.

    Bisection on the count with end-to-end measurements (``measure(taus, which, block_layers)``) of the calibration
    samples, then the same bisection on the held-out samples below that count: the most layers that pass both.
    (Halving the count until the held-out samples pass, as before, threw away most of what the calibration found:
    17 layers became 2 on Qwen2.5-Coder at 32K.)
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

    held_evaluations: dict[int, dict] = {}

    def held_out_passes(n: int) -> bool:
        if n not in held_evaluations:
            held_evaluations[n] = held_out(n)
        return n == 0 or budget.met(held_evaluations[n], held_out=True)

    calibrated = count
    count = bisect(calibrated + 1, held_out_passes, None)
    held = held_evaluations.get(count) or held_out(count)
    layers = sorted(order[:count])
    report = {"order": order, "layers": layers, "held_out": held, "calibration_count": calibrated,
              "held_out_evaluations": [{"layers": n, "kl": e["kl"], "top1_agreement": e["top1_agreement"]}
                                       for n, e in sorted(held_evaluations.items())],
              "calibration": measured(count) if count else baseline["calibration"],
              "evaluations": [{"layers": n, **{k: e[k] for k in ("kl", "top1_agreement", "attention_cost")}}
                              for n, e in sorted(evaluations.items())]}
    return layers, report
