"""Where TSA pays on this machine: every sparse layer timed against dense at a ladder of prompt lengths.

One prefill of a calibration sample runs the model densely; inside every layer the chosen policy makes sparse,
the attention function is timed twice on the layer's real queries, keys and values, cut to each length of the
ladder (a prefix of a prompt is a prompt): as the runtime runs it with the policy (``tsa_attention_forward``), and
densely with the same kernel (``dense_forward``). Each layer's activation length is the shortest ladder length from
which that layer is never slower than dense, so no layer, and no prompt length, runs slower than the model it came
from (as far as attention, the only thing TSA changes, is concerned).

Times on CUDA come from CUDA events after a warm-up call (compilation, autotuning), median of several calls; on
a CPU from the wall clock. Each layer is timed twice: alone (``dense_ms``, ``tsa_ms``: its launches exposed, as at
the start of a prefill), and with the GPU kept busy ahead of it (``*_busy_ms``, ``bench.time_cuda``'s
``busy_ahead``: its device time with the launches hidden, as deep inside a long prefill, where the host runs
ahead of the GPU). A layer's rule reads its device time where there is one: on Qwen2.5-Coder-0.5B at 32K the
block-sparse path's launches (about 3 ms of host time a layer) exceed a layer's whole dense attention when timed
alone, yet inside the prefill they overlap the earlier layers' kernels.

The host time those layers add is then checked where it counts: the whole model's prefill (``time_prefills``),
with each layer engaged from its own length, against the dense model at every ladder length. Where it is not at
least ``MIN_PREFILL_GAIN`` faster, every layer's activation is raised past that length (``prefill_floor``), so at
every timed length the model is either measurably faster or runs the dense model's code.

Before the search, the same timing prices the front (``front.py``) in time instead of FLOPs: every measured layer
timed at the grid's lowest and highest tau (``cost_points``) gives, per kernel, a line from the share of dense
attention FLOPs a layer computes to the share of dense attention time it takes (``fit_time_model``). An option
slower than dense is then worth nothing, so the error budget goes to the layers that will engage.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsa_patch.bench import time_cuda
from tsa_patch.kernels.attention import (attention_summary, dense_forward, register_attention, tsa_attention_forward,
                                         tsa_statistics)
from tsa_patch.kernels.policy import TsaPolicy

_TIMING_KEY = "tsa_calibration_timing"
_RUNS = 5


MIDPOINTS_FROM = 8192
"""From this length on the ladder also takes the midpoint (×1.5) after each power of two. On an H200 sparse layers
cross over dense between 8K and 32K: the TSA layers of the real Qwen2.5-Coder-0.5B ran ×0.85–0.91 of dense at 16K
and ×2.5–2.9 at 32K, so with a whole octave between rungs they ran dense on every prompt below 32,000 tokens."""


MIN_PREFILL_GAIN = 0.02
"""How much faster than dense the whole prefill must be at a length for the policy to engage there. A smaller gain is
within the scatter of a launch-bound prefill between one timing and the next, and buys next to nothing: on the H200
the joint Qwen2.5-Coder-0.5B policy's 8K prefill timed ×1.005 of dense inside ``calibrate`` and ×0.87 (fastest
rounds ×0.90) when its export was timed right after, while at 12K-32K the two timings agreed within 4 %. A margin
does not make a launch-bound length portable: the host's launch cost varies from machine to machine (the same
layers ran ×0.99 there on another day's machine)."""


@dataclass(frozen=True)
class TimeModel:
    """A sparse layer's attention time as a share of its dense time, on one card at one length:
    ``overhead + per_cost * cost``, where ``cost`` is the share of dense attention FLOPs it computes."""

    overhead: float
    per_cost: float
    points: int

    def time_saved(self, cost: float) -> float:
        """The share of the layer's dense attention time saved at ``cost`` (0 where it would be slower)."""
        return max(0.0, 1.0 - self.overhead - self.per_cost * cost)

    def break_even(self) -> float:
        """The computed share below which the layer is faster than dense (0: never faster)."""
        return max(0.0, (1.0 - self.overhead) / self.per_cost)

    def to_dict(self) -> dict:
        return {"overhead": round(self.overhead, 4), "per_cost": round(self.per_cost, 4), "points": self.points,
                "break_even_cost": round(self.break_even(), 4)}


MIN_COST_SPREAD = 0.05
"""The least spread of computed shares a fit needs: closer points give the slope from timing noise alone."""


def fit_time_model(points: list[dict]) -> TimeModel | None:
    """Least-squares line through ``cost_points``' points (``cost``, ``ratio``); None with fewer than two points,
    costs spread less than ``MIN_COST_SPREAD``, or a slope that is not positive (time must grow with work)."""
    if len(points) < 2:
        return None
    costs, ratios = [p["cost"] for p in points], [p["ratio"] for p in points]
    if max(costs) - min(costs) < MIN_COST_SPREAD:
        return None
    mean_cost, mean_ratio = statistics.fmean(costs), statistics.fmean(ratios)
    spread = sum((c - mean_cost) ** 2 for c in costs)
    slope = sum((c - mean_cost) * (r - mean_ratio) for c, r in zip(costs, ratios)) / spread
    if slope <= 0:
        return None
    return TimeModel(overhead=mean_ratio - slope * mean_cost, per_cost=slope, points=len(points))


def cost_points(model, ids: list[int], policy: TsaPolicy, length: int) -> list[dict]:
    """Every sparse layer of ``policy`` timed at ``length`` (``measure_speed``): its kernel (``"tsa"`` or
    ``"block_sparse"``), the share of dense attention FLOPs it computed, and its time over dense (device times where
    measured)."""
    speed = measure_speed(model, ids, policy, [length])
    points = []
    for index, times in speed["layers"].items():
        deciding = _deciding_times(times)
        points.append({"layer": int(index), "tau": policy.layers[int(index)].tau,
                       "path": "block_sparse" if int(index) in policy.block_sparse_layers else "tsa",
                       "cost": times["attention_cost"][0],
                       "ratio": round(deciding["tsa_ms"][0] / deciding["dense_ms"][0], 4)})
    return points


def pricing_policies(measurements, make_policy: Callable[[list[float], tuple[int, ...]], TsaPolicy]
                     ) -> list[TsaPolicy]:
    """The policies that price the front: every measured layer (``measure.LayerMeasurement``) at the grid's lowest
    tau, then at its highest, and alone on the block-sparse kernel where that option was measured.
    ``make_policy(taus, block_layers)`` gives a policy."""
    measured = [i for i, m in enumerate(measurements) if m.samples]
    grid = measurements[measured[0]].taus
    policies = [make_policy([tau if i in measured else 0.0 for i in range(len(measurements))], ())
                for tau in (grid[0], grid[-1])]
    blocks = tuple(i for i in measured if measurements[i].block_saving is not None)
    if blocks:
        policies.append(make_policy([0.0] * len(measurements), blocks))
    return policies


def time_models(model, ids: list[int], policies: list[TsaPolicy], length: int,
                step: Callable[[], None] | None = None) -> tuple[dict[str, TimeModel], list[dict]]:
    """Every sparse layer of each of ``policies`` (``pricing_policies``) timed against dense at ``length``
    (``cost_points``), and per kernel the line fitted through its points where one can be. Returns the fitted
    models by kernel (``"tsa"``, ``"block_sparse"``) and every point."""
    points = []
    for policy in policies:
        points += cost_points(model, ids, policy, length)
        if step is not None:
            step()
    fitted = {kernel: fit_time_model([p for p in points if p["path"] == kernel]) for kernel in ("tsa", "block_sparse")}
    return {kernel: m for kernel, m in fitted.items() if m is not None}, points


def ladder(seq_len: int, shortest: int = 1024) -> list[int]:
    """Powers of two from ``shortest`` below ``seq_len``, each from ``MIDPOINTS_FROM`` on followed by its midpoint
    (×1.5), and ``seq_len`` itself."""
    lengths, length = [], shortest
    while length < seq_len:
        lengths.append(length)
        if length >= MIDPOINTS_FROM and length * 3 // 2 < seq_len:
            lengths.append(length * 3 // 2)
        length *= 2
    return lengths + [seq_len]


@torch.no_grad()
def measure_speed(model, ids: list[int], policy: TsaPolicy, lengths: list[int]) -> dict:
    """Time every sparse layer of ``policy`` (engaged at every length) against dense on ``ids``.

    Returns ``{"lengths", "dense_ms", "tsa_ms"}``: per length, the summed attention time of the sparse layers,
    dense and with TSA, in milliseconds, and ``"layers"`` with each layer's times and ``attention_cost`` (the share of
    dense attention FLOPs it computed with TSA).
    """
    from tsa_patch.models import apply_policy_

    sparse = set(policy.sparse_layers) | set(policy.block_sparse_layers)
    engaged = TsaPolicy.from_dict({**policy.to_dict(), "activation_length": policy.window + 1})
    apply_policy_(model, engaged)
    per_layer: dict[int, dict] = {}

    def timing(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if module.layer_idx in sparse:
            per_layer[module.layer_idx] = _time_layer(module, query, key, value, scaling, engaged, lengths, kwargs)
        return dense_forward(module, query, key, value, attention_mask, scaling=scaling,
                             softcap=kwargs.pop("softcap", None), dense_backend=engaged.dense_backend,
                             dropout=dropout, is_causal=is_causal, **kwargs), None

    register_attention(_TIMING_KEY, timing)
    model.set_attn_implementation(_TIMING_KEY)
    model.model(torch.tensor([ids[: lengths[-1]]], device=next(model.parameters()).device))
    dense = [sum(per_layer[i]["dense_ms"][j] for i in per_layer) for j in range(len(lengths))]
    tsa = [sum(per_layer[i]["tsa_ms"][j] for i in per_layer) for j in range(len(lengths))]
    return {"lengths": lengths, "dense_ms": [round(t, 4) for t in dense], "tsa_ms": [round(t, 4) for t in tsa],
            "layers": {str(i): per_layer[i] for i in sorted(per_layer)}}


def layer_activations(speed: dict, seq_len: int) -> dict[int, int]:
    """Every timed layer's own activation length (``measure_speed``'s result): the shortest ladder length from
    which the layer is never slower than dense (in device time where it was measured, else alone), or
    ``seq_len + 1`` where it is slower at the longest length (it engages only beyond the calibrated length, where
    it was never timed)."""
    activations = {}
    for index, times in speed["layers"].items():
        own = activation_from({"lengths": speed["lengths"], **_deciding_times(times)})
        activations[int(index)] = seq_len + 1 if own is None else own
    return activations


def _deciding_times(times: dict) -> dict:
    """A timed layer's ``dense_ms`` and ``tsa_ms`` as the rules read them: its device times where they were measured
    (``*_busy_ms``), else its times alone."""
    busy = "tsa_busy_ms" in times
    return {"dense_ms": times["dense_busy_ms" if busy else "dense_ms"],
            "tsa_ms": times["tsa_busy_ms" if busy else "tsa_ms"]}


@torch.no_grad()
def time_prefills(model, ids: list[int], policy: TsaPolicy, lengths: list[int], rounds: int = 3) -> dict:
    """The whole model's prefill of ``ids`` cut to every length, with ``policy`` and densely with its dense kernel,
    interleaved over ``rounds`` (drifts of the host hit both); milliseconds, median of the rounds. None at a length
    where no layer engages (an export runs the dense model's own code there)."""
    from tsa_patch.kernels.attention import dense_everywhere
    from tsa_patch.kernels.dense import sdpa_backend
    from tsa_patch.kernels.policy import ATTENTION_KEY
    from tsa_patch.models import apply_policy_

    device = next(model.parameters()).device
    apply_policy_(model, policy)
    result = {"lengths": lengths, "dense_ms": [], "policy_ms": []}
    for length in lengths:
        if dense_everywhere(policy, length, length):
            result["dense_ms"].append(None)
            result["policy_ms"].append(None)
            continue
        prompt = torch.tensor([ids[:length]], device=device)
        times: dict[str, list[float]] = {"dense_ms": [], "policy_ms": []}
        for _ in range(rounds):
            for name, implementation in (("dense_ms", "sdpa"), ("policy_ms", ATTENTION_KEY)):
                model.set_attn_implementation(implementation)
                with sdpa_backend(policy.dense_backend, device):
                    times[name].append(_median_ms(lambda: model.model(prompt), device))
        for name, values in times.items():
            result[name].append(round(statistics.median(values), 4))
    return result


def prefill_floor(prefills: dict, seq_len: int) -> int | None:
    """The length every layer must engage from at least so that the whole model is faster than dense by
    ``MIN_PREFILL_GAIN`` at every timed length where it engages (``time_prefills``' result): the ladder length after
    the longest one at which the policy's prefill was not (``seq_len + 1`` after the last), None where it always
    was."""
    lengths = prefills["lengths"]
    slower = [i for i, (dense, tsa) in enumerate(zip(prefills["dense_ms"], prefills["policy_ms"]))
              if tsa is not None and tsa > dense * (1 - MIN_PREFILL_GAIN)]
    if not slower:
        return None
    return lengths[slower[-1] + 1] if slower[-1] + 1 < len(lengths) else seq_len + 1


def activation_from(speed: dict) -> int | None:
    """The shortest ladder length from which TSA is never slower than dense; None if it is slower at the longest."""
    activation = None
    for length, dense, tsa in reversed(list(zip(speed["lengths"], speed["dense_ms"], speed["tsa_ms"]))):
        if tsa > dense:
            break
        activation = length
    return activation


def _time_layer(module, query, key, value, scaling, policy: TsaPolicy, lengths: list[int], kwargs: dict) -> dict:
    """Median milliseconds of the layer's attention at each length: TSA as the runtime runs it, and dense; and the
    share of dense attention FLOPs TSA computed there."""
    options = {k: v for k, v in kwargs.items() if k in ("softcap", "sliding_window")}
    times: dict[str, list[float]] = {"dense_ms": [], "tsa_ms": []}
    costs = []
    if query.is_cuda:
        times.update(dense_busy_ms=[], tsa_busy_ms=[])
    for length in lengths:
        q, k, v = query[:, :, :length], key[:, :, :length], value[:, :, :length]
        runs = {"dense": lambda: dense_forward(module, q, k, v, None, scaling=scaling, softcap=options.get("softcap"),
                                               dense_backend=policy.dense_backend),
                "tsa": lambda: tsa_attention_forward(module, q, k, v, None, scaling=scaling, **options)}
        for name, run in runs.items():
            times[f"{name}_ms"].append(_median_ms(run, q.device))
            if query.is_cuda:
                times[f"{name}_busy_ms"].append(_median_ms(run, q.device, busy_ahead=True))
        costs.append(round(attention_summary(tsa_statistics(module))["attention_cost"], 4))
    return {**{name: [round(t, 4) for t in values] for name, values in times.items()}, "attention_cost": costs}


def _median_ms(fn: Callable[[], object], device: torch.device, busy_ahead: bool = False) -> float:
    """Median of ``_RUNS`` timed calls after one warm-up (CUDA events on a GPU, the wall clock elsewhere)."""
    return time_cuda(fn, budget_s=0.0, min_runs=_RUNS, max_runs=_RUNS, device=device,
                     busy_ahead=busy_ahead).median_ms
