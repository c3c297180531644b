"""The predicted Pareto front of per-layer policies, from the per-layer measurements (``measure.py``).

For a price lambda, each layer picks the tau that maximises ``saving - lambda * error`` (saving = 1 - kept^2, the
share of the layer's attention FLOPs removed). Sweeping lambda from infinity to 0 gives a sequence of policies
from all-dense to the sparsest, each the best trade-off for its predicted error under an additive error model.
The search (``search.py``) then measures candidates end to end, which captures interactions between layers that
the model ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsa_patch.calibration.measure import LayerMeasurement


@dataclass(frozen=True)
class Candidate:
    """A policy on the predicted Pareto front: per-layer taus, predicted error and attention removed."""

    taus: tuple[float, ...]
    predicted_error: float
    attention_removed: float  # mean over layers of 1 - kept^2: share of the model's attention FLOPs removed


def _options(m: LayerMeasurement) -> list[tuple[float, float, float]]:
    """(tau, saving, error) per option of one layer, dense included; only dense for a layer never measured
    (a sliding-window layer)."""
    if not m.samples:
        return [(0.0, 0.0, 0.0)]
    return [(0.0, 0.0, 0.0)] + [(tau, 1.0 - m.mean_kept(i) ** 2, m.mean_error(i)) for i, tau in enumerate(m.taus)]


def _choose(measurements: list[LayerMeasurement], price: float) -> Candidate:
    taus, error, saving = [], 0.0, 0.0
    for m in measurements:
        # lowest tau among ties keeps the policy as dense as the price allows
        tau, s, e = max(_options(m), key=lambda o: (o[1] - price * o[2], -o[0]))
        taus.append(tau)
        error += e
        saving += s
    return Candidate(taus=tuple(taus), predicted_error=error, attention_removed=saving / len(measurements))


def pareto_policies(measurements: list[LayerMeasurement]) -> list[Candidate]:
    """Distinct policies from all-dense to the sparsest, in order of increasing predicted error.

    Every price at which some layer changes its choice is visited (the breakpoints of the Lagrangian), so the
    sequence contains every policy the additive model can prefer.
    """
    prices = {0.0}
    for m in measurements:
        options = _options(m)
        for a in options:
            for b in options:
                if b[2] > a[2] and b[1] > a[1]:
                    price = (b[1] - a[1]) / (b[2] - a[2])
                    prices.update((price * 0.999, price * 1.001))
    candidates = {_choose(measurements, p).taus: _choose(measurements, p) for p in sorted(prices, reverse=True)}
    candidates[tuple(0.0 for _ in measurements)] = Candidate(tuple(0.0 for _ in measurements), 0.0, 0.0)
    return sorted(candidates.values(), key=lambda c: (c.predicted_error, c.attention_removed))


def attention_removed(measurements: list[LayerMeasurement], taus) -> float:
    """Predicted share of the model's attention FLOPs that the per-layer ``taus`` remove (mean of 1 - kept^2)."""
    total = 0.0
    for m, tau in zip(measurements, taus):
        total += 0.0 if tau == 0 else 1.0 - m.mean_kept(m.taus.index(tau)) ** 2
    return total / len(measurements)
