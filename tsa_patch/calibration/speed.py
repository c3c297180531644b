"""Where TSA pays on this machine: every sparse layer timed against dense at a ladder of prompt lengths.

One prefill of a calibration sample runs the model densely; inside every layer the chosen policy makes sparse,
the attention function is timed twice on the layer's real queries, keys and values, cut to each length of the
ladder (a prefix of a prompt is a prompt): as the runtime runs it with the policy (``tsa_attention_forward``), and
densely with the same kernel (``dense_forward``). Each layer's activation length is the shortest ladder length from
which that layer is never slower than dense, so no layer, and no prompt length, runs slower than the model it came
from (as far as attention, the only thing TSA changes, is concerned).

Times on CUDA come from CUDA events after a warm-up call (compilation, autotuning), median of several calls; on
a CPU from the wall clock. A layer is timed alone, its launches not hidden behind the rest of the model: if
anything, this overstates TSA's cost at short lengths, which keeps the choice on the safe side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tsa_patch.bench import time_cuda
from tsa_patch.kernels.attention import dense_forward, register_attention, tsa_attention_forward
from tsa_patch.kernels.policy import TsaPolicy

_TIMING_KEY = "tsa_calibration_timing"
_RUNS = 5


def ladder(seq_len: int, shortest: int = 1024) -> list[int]:
    """Powers of two from ``shortest`` below ``seq_len``, and ``seq_len`` itself."""
    lengths, length = [], shortest
    while length < seq_len:
        lengths.append(length)
        length *= 2
    return lengths + [seq_len]


@torch.no_grad()
def measure_speed(model, ids: list[int], policy: TsaPolicy, lengths: list[int]) -> dict:
    """Time every sparse layer of ``policy`` (engaged at every length) against dense on ``ids``.

    Returns ``{"lengths", "dense_ms", "tsa_ms"}``: per length, the summed attention time of the sparse layers,
    dense and with TSA, in milliseconds, and ``"layers"`` with each layer's times.
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
    which the layer is never slower than dense, or ``seq_len + 1`` where it is slower at the longest length (it
    engages only beyond the calibrated length, where it was never timed)."""
    activations = {}
    for index, times in speed["layers"].items():
        own = activation_from({"lengths": speed["lengths"], **times})
        activations[int(index)] = seq_len + 1 if own is None else own
    return activations


def activation_from(speed: dict) -> int | None:
    """The shortest ladder length from which TSA is never slower than dense; None if it is slower at the longest."""
    activation = None
    for length, dense, tsa in reversed(list(zip(speed["lengths"], speed["dense_ms"], speed["tsa_ms"]))):
        if tsa > dense:
            break
        activation = length
    return activation


def _time_layer(module, query, key, value, scaling, policy: TsaPolicy, lengths: list[int], kwargs: dict) -> dict:
    """Median milliseconds of the layer's attention at each length: TSA as the runtime runs it, and dense."""
    options = {k: v for k, v in kwargs.items() if k in ("softcap", "sliding_window")}
    dense_ms, tsa_ms = [], []
    for length in lengths:
        q, k, v = query[:, :, :length], key[:, :, :length], value[:, :, :length]
        dense_ms.append(_median_ms(lambda: dense_forward(module, q, k, v, None, scaling=scaling,
                                                         softcap=options.get("softcap"),
                                                         dense_backend=policy.dense_backend), q.device))
        tsa_ms.append(_median_ms(lambda: tsa_attention_forward(module, q, k, v, None, scaling=scaling, **options),
                                 q.device))
    return {"dense_ms": [round(t, 4) for t in dense_ms], "tsa_ms": [round(t, 4) for t in tsa_ms]}


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median of ``_RUNS`` timed calls after one warm-up (CUDA events on a GPU, the wall clock elsewhere)."""
    return time_cuda(fn, budget_s=0.0, min_runs=_RUNS, max_runs=_RUNS, device=device).median_ms
