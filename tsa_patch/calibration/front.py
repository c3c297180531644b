"""The predicted Pareto front of per-layer policies, from the per-layer measurements (``measure.py``).

For a price lambda, each layer picks the option that maximises ``saving - lambda * error``: dense, TSA at one of
the measured taus (saving: the share of the layer's attention FLOPs removed, 1 - kept^2 with the paper's
compression, the measured share where every query row is computed), or, where it was
measured, the block-sparse kernel alone (its measured saving and end-to-end error). Priced by time
(``time_models``, fitted on a GPU by ``speed.fit_time_model``), the saving is instead the share of the layer's dense
attention time the option saves on that card: an option slower than dense saves nothing. Sweeping lambda from infinity
to 0 gives a sequence of policies from all-dense to the sparsest, each the best trade-off for its predicted error
under an additive error model. The search (``search.py``) then measures candidates end to end, which captures
interactions between layers that the model ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsa_patch.calibration.measure import LayerMeasurement
from tsa_patch.calibration.speed import TimeModel


@dataclass(frozen=True)
class Candidate:
    """A policy on the predicted Pareto front: per-layer taus (0 = no TSA), the layers that run the block-sparse
    kernel alone, predicted error and attention removed."""

    taus: tuple[float, ...]
    predicted_error: float
    attention_removed: float  # mean over layers of the share of their attention FLOPs removed
    block_layers: tuple[int, ...] = ()
    time_saved: float | None = None  # priced by time: mean over layers of the share of attention time saved

    @property
    def value(self) -> float:
        """What the front maximised: the share of attention time saved, or of attention FLOPs removed."""
        return self.attention_removed if self.time_saved is None else self.time_saved


@dataclass(frozen=True)
class _Option:
    tau: float  # 0: no TSA
    saving: float  # share of the layer's attention FLOPs removed
    error: float
    value: float  # what the front maximises: the saving, or the share of attention time saved
    block_sparse: bool = False


def _options(m: LayerMeasurement, time_models: dict[str, TimeModel] | None = None) -> list[_Option]:
    """The options of one layer, dense first; only dense for a layer never measured (a sliding-window layer).
    ``time_models`` (by kernel, ``"tsa"`` and ``"block_sparse"``) value an option by the time it saves."""

    def option(tau: float, saving: float, error: float, kernel: str = "tsa") -> _Option:
        model = (time_models or {}).get(kernel)
        value = saving if model is None else model.time_saved(1.0 - saving)
        return _Option(tau, saving, error, value, block_sparse=kernel == "block_sparse")

    options = [_Option(0.0, 0.0, 0.0, 0.0)]
    if not m.samples:
        return options
    options += [option(tau, m.saving(i), m.mean_error(i)) for i, tau in enumerate(m.taus)]
    if m.block_saving is not None and m.block_error is not None:
        options.append(option(0.0, m.block_saving, m.block_error, "block_sparse"))
    return options


def _choose(layer_options: list[list[_Option]], price: float, priced_by_time: bool) -> Candidate:
    taus, blocks, error, saving, value = [], [], 0.0, 0.0, 0.0
    for layer, options in enumerate(layer_options):
        # ties go to the densest option: the lowest tau, then TSA before the block-sparse kernel
        best = max(options, key=lambda o: (o.value - price * o.error, -o.tau, -o.block_sparse))
        taus.append(best.tau)
        if best.block_sparse:
            blocks.append(layer)
        error += best.error
        saving += best.saving
        value += best.value
    return Candidate(taus=tuple(taus), predicted_error=error, attention_removed=saving / len(layer_options),
                     block_layers=tuple(blocks), time_saved=value / len(layer_options) if priced_by_time else None)


def pareto_policies(measurements: list[LayerMeasurement], time_models: dict[str, TimeModel] | None = None
                    ) -> list[Candidate]:
    """Distinct policies from all-dense to the sparsest, in order of increasing predicted error, each option valued
    by the FLOPs it removes or, with ``time_models``, by the time it saves.

    Every price at which some layer changes its choice is visited (the breakpoints of the Lagrangian), so the
    sequence contains every policy the additive model can prefer.
    """
    layer_options = [_options(m, time_models) for m in measurements]
    prices = {0.0}
    for options in layer_options:
        for a in options:
            for b in options:
                if b.error > a.error and b.value > a.value:
                    price = (b.value - a.value) / (b.error - a.error)
                    prices.update((price * 0.999, price * 1.001))
    candidates = {}
    for price in sorted(prices, reverse=True):
        candidate = _choose(layer_options, price, bool(time_models))
        candidates[candidate.taus, candidate.block_layers] = candidate
    dense = Candidate(tuple(0.0 for _ in measurements), 0.0, 0.0, time_saved=0.0 if time_models else None)
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
