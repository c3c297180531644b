"""Each layer's error estimate checked end to end: how much one sparse layer actually costs the continuation.

The residual estimate of ``measure.py`` comes from one dense forward of natural text. It ranks the taus of one
layer well, but not the layers against one another: measured on Qwen2.5-Coder-0.5B at 32K, each layer alone at
tau 0.005 had a residual estimate between 0.007 and 0.035 in layers 1-23, while the KL of its recall probes, end
to end, ran from 1e-6 (layer 23) to 0.51 (layer 15): dropping tokens in an early or middle layer damages the far
tokens' representations that retrieval later needs (benchmarks/results/real-qwen-layers-alone-*.json). The
additive front then spends the budget on layers that break recall, and its KL rises by orders of magnitude over a
short stretch.

So every measured layer is also run alone, sparse at each of ``REFERENCE_TAUS``, end to end on the calibration
samples (the budget's metric: the worst KL of natural continuations, recall and aggregation probes), and its
residual estimates are rescaled by the measured KL over the estimate: at the reference taus exactly, between them
by interpolation in log tau, beyond them by the nearest ratio. The front (``front.py``) is then built on predicted
KL in nats.

With ``--block-sparse``, every measured layer is also run alone with the block-sparse kernel (no TSA) the same
way: its KL and the share of the layer's attention FLOPs its block map skipped become that layer's block-sparse
option on the front, next to its taus. (On Qwen2.5-Coder-0.5B at 32K the kernel alone cost at most 0.0035 of
recall KL in 21 of 24 layers while computing 11-73 % of a layer's attention (24 % in the median layer), where TSA
at the paper's tau broke recall in layers 0-15.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tsa_patch.calibration.measure import LayerMeasurement

# The paper's tau and a stronger one: the taus at which each layer is measured alone, end to end.
REFERENCE_TAUS = (0.005, 0.02)
# Where the residual estimate is this small, the layer dropped nothing at that tau: no ratio to learn there.
_NOTHING_DROPPED = 1e-12


def check_layers_end_to_end(measurements: list[LayerMeasurement], layer_kl: Callable[[int, float], float],
                            step: Callable[[], None] | None = None) -> list[dict]:
    """Rescale every measured layer's error estimates (in place) by its end-to-end KL alone at ``REFERENCE_TAUS``.

    Args:
        measurements: per-layer measurements (``measure.measure_layers``); layers never measured are skipped.
        layer_kl: ``layer_kl(layer, tau)``: the end-to-end KL of the policy with only ``layer`` sparse at ``tau``.
        step: called once per end-to-end evaluation (progress).

    Returns:
        One record per evaluation: layer, tau, its residual estimate, the measured KL and their ratio.
    """
    records = []
    for layer, m in enumerate(measurements):
        if not m.samples:
            continue
        ratios: dict[float, float] = {}
        for tau in (t for t in REFERENCE_TAUS if t in m.taus):
            estimate, kl = m.mean_error(m.taus.index(tau)), 0.0
            if estimate > _NOTHING_DROPPED:
                kl = layer_kl(layer, tau)
                ratios[tau] = kl / estimate
            if step is not None:
                step()
            records.append({"layer": layer, "tau": tau, "estimate": round(estimate, 6), "kl": round(kl, 6),
                            "ratio": round(ratios[tau], 4) if tau in ratios else None})
        if ratios:
            m.error = [error * _ratio_at(tau, ratios) for tau, error in zip(m.taus, m.error)]
    return records


def _ratio_at(tau: float, ratios: dict[float, float]) -> float:
    """The KL/estimate ratio at ``tau``: interpolated in log tau between the measured taus (log-linear in the
    ratio, or linear where a ratio is 0), the nearest measured ratio outside them."""
    known = sorted(ratios)
    if tau <= known[0]:
        return ratios[known[0]]
    if tau >= known[-1]:
        return ratios[known[-1]]
    low = max(t for t in known if t <= tau)
    high = min(t for t in known if t >= tau)
    if low == high:
        return ratios[low]
    weight = (math.log(tau) - math.log(low)) / (math.log(high) - math.log(low))
    a, b = ratios[low], ratios[high]
    if a <= 0 or b <= 0:
        return a + weight * (b - a)
    return math.exp(math.log(a) + weight * (math.log(b) - math.log(a)))


def check_block_sparse_end_to_end(measurements: list[LayerMeasurement],
                                  layer_block: Callable[[int], tuple[float, float]],
                                  step: Callable[[], None] | None = None) -> list[dict]:
    """Give every measured layer its block-sparse option (in place), measured with that layer alone block-sparse.

    Args:
        measurements: per-layer measurements; layers never measured (sliding-window layers) are skipped.
        layer_block: ``layer_block(layer) -> (kl, density)``: the end-to-end KL of the policy with only ``layer``
            on the block-sparse kernel, and the fraction of the layer's causal attention its block map computed.
        step: called once per end-to-end evaluation (progress).

    Returns:
        One record per layer: layer, kl, density.
    """
    records = []
    for layer, m in enumerate(measurements):
        if not m.samples:
            continue
        kl, density = layer_block(layer)
        m.block_saving, m.block_error = 1.0 - density, kl
        if step is not None:
            step()
        records.append({"layer": layer, "kl": round(kl, 6), "density": round(density, 4)})
    return records
