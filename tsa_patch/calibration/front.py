"""The predicted Pareto front of per-layer policies, from the per-layer measurements (``measure.py``).

For a price lambda, each layer picks the option that maximises ``saving - lambda * error``: dense, TSA at one of
the measured taus (saving: the share of the layer's attention FLOPs removed, 1 - kept^2 with the paper's
compression, the measured share where every query row is computed), or, where it was
measured, the block-sparse kernel alone (its measured saving and end-to-end error). Sweeping lambda from infinity
to 0 gives a sequence of policies from all-dense to the sparsest, each the best trade-off for its predicted error
under an additive error model. The search (``search.py``) then measures candidates end to end, which captures
interactions between layers that the model ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsa_patch.calibration.measure import LayerMeasurement


@dataclass(frozen=True)
class Candidate:
    """A policy on the predicted Pareto front: per-layer taus (0 = no TSA), the layers that run the block-sparse
    kernel alone, predicted error and attention removed."""

    taus: tuple[float, ...]
    predicted_error: float
    attention_removed: float  # mean over layers of the share of their attention FLOPs removed
    block_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Option:
    tau: float  # 0: no TSA
    saving: float
    error: float
    block_sparse: bool = False


def _options(m: LayerMeasurement) -> list[_Option]:
    """The options of one layer, dense first; only dense for a layer never measured (a sliding-window layer)."""
    if not m.samples:
        return [_Option(0.0, 0.0, 0.0)]
    options = [_Option(0.0, 0.0, 0.0)]
    options += [_Option(tau, m.saving(i), m.mean_error(i)) for i, tau in enumerate(m.taus)]
    if m.block_saving is not None and m.block_error is not None:
        options.append(_Option(0.0, m.block_saving, m.block_error, block_sparse=True))
    return options


def _choose(measurements: list[LayerMeasurement], price: float) -> Candidate:
    taus, blocks, error, saving = [], [], 0.0, 0.0
    for layer, m in enumerate(measurements):
        # ties go to the densest option: the lowest tau, then TSA before the block-sparse kernel
        best = max(_options(m), key=lambda o: (o.saving - price * o.error, -o.tau, -o.block_sparse))
        taus.append(best.tau)
        if best.block_sparse:
            blocks.append(layer)
        error += best.error
        saving += best.saving
    return Candidate(taus=tuple(taus), predicted_error=error, attention_removed=saving / len(measurements),
                     block_layers=tuple(blocks))


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
                if b.error > a.error and b.saving > a.saving:
                    price = (b.saving - a.saving) / (b.error - a.error)
                    prices.update((price * 0.999, price * 1.001))
    candidates = {}
    for price in sorted(prices, reverse=True):
        candidate = _choose(measurements, price)
        candidates[candidate.taus, candidate.block_layers] = candidate
    dense = Candidate(tuple(0.0 for _ in measurements), 0.0, 0.0)
    candidates[dense.taus, ()] = dense
    return sorted(candidates.values(), key=lambda c: (c.predicted_error, c.attention_removed))


def attention_removed(measurements: list[LayerMeasurement], taus, rows: str | None = None, block_layers=(),
                      engaged=None) -> float:
    """Predicted share of the model's attention FLOPs that the per-layer ``taus`` (and the block-sparse kernel in
    ``block_layers``) remove when sparse layers compute ``rows`` (``LayerMeasurement.saving``; None: as measured);
    ``engaged``: only these layers count, the others running dense (None: all)."""
    total = 0.0
    for layer, (m, tau) in enumerate(zip(measurements, taus)):
        if engaged is not None and layer not in engaged:
            continue
        if layer in block_layers:
            total += m.block_saving
        elif tau:
            total += m.saving(m.taus.index(tau), rows)
    return total / len(measurements)
