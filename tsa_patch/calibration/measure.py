"""Per-layer measurements: every layer at every candidate tau, in one dense forward per sample.

Inside every layer's attention (the dense output is what the model keeps), TSA is also run for each candidate tau
on the same Q/K/V, and two numbers are recorded: the kept fraction, and the layer's error: the perturbation the
sparsified attention block adds to the residual stream, ``r(p) = ||o_proj(TSA - dense)[p]||^2 / ||h[p]||^2``,
averaged over ALL positions. Every position counts because the continuation reads every position's keys and
values in later layers. (Measured on SmolLM2-135M at 4K tokens, this uniform average predicts the end-to-end KL of
a policy far better than averages restricted to the last queries or weighted by their attention: at 34 % of
attention FLOPs removed, policies built from it measured KL 0.023 against 0.046 and 0.070.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tsa_patch.calibration.drift import decoder_layers
from tsa_patch.kernels.attention import DENSE, STATS_ATTR, dense_forward, layer_statistics, register_attention
from tsa_patch.kernels.policy import TsaPolicy
from tsa_patch.kernels.reference import kept_count_ref
from tsa_patch.kernels.tsa import HAS_TRITON, sparse_attention, sparse_attention_kept_keys, token_scores

# Candidate coverage thresholds, calibrate's default (``--taus``; 0 = dense is always an option too).
TAU_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# Registered only while measuring: the model runs dense, and the function measures TSA on the side.
_MEASURE_KEY = "tsa_calibration_measure"


@dataclass
class LayerMeasurement:
    """Sums over samples for one decoder layer; ``kept[i]`` and ``error[i]`` belong to ``taus[i]``.

    ``computed[i]``: where the policy's sparse layers compute every query row (``rows="all"``), the sum over
    samples of the share of dense causal attention that ``taus[i]`` computes; None otherwise (the paper's compression
    computes ``kept ** 2`` of it).
    ``block_saving`` and ``block_error``: the share of the layer's attention FLOPs that the block-sparse kernel alone
    removed and the KL it cost, measured end to end with the layer alone block-sparse (``layer_check``); None
    where that option was not measured.
    """

    taus: tuple[float, ...]
    kept: list[float]
    error: list[float]
    samples: int = 0
    computed: list[float] | None = None
    block_saving: float | None = None
    block_error: float | None = None

    def mean_kept(self, i: int) -> float:
        return self.kept[i] / self.samples

    def mean_error(self, i: int) -> float:
        return self.error[i] / self.samples

    def saving(self, i: int, rows: str | None = None) -> float:
        """The share of the layer's attention FLOPs that ``taus[i]`` removes when sparse layers compute ``rows``:
        "kept" (the paper's compression, ``1 - kept ** 2``) or "all" (the measured share); None: the rows these
        measurements were taken with."""
        if rows == "all" or (rows is None and self.computed is not None):
            return 1.0 - self.computed[i] / self.samples
        return 1.0 - self.mean_kept(i) ** 2


def new_measurements(num_layers: int, taus: tuple[float, ...] = TAU_GRID, rows: str = "kept"
                     ) -> list[LayerMeasurement]:
    """Empty per-layer sums, to be filled by forwards inside ``measuring`` (``rows`` as the policy's)."""
    return [LayerMeasurement(taus=tuple(taus), kept=[0.0] * len(taus), error=[0.0] * len(taus),
                             computed=[0.0] * len(taus) if rows == "all" else None)
            for _ in range(num_layers)]


@contextlib.contextmanager
def measuring(model, measurements: list[LayerMeasurement], policy: TsaPolicy) -> Iterator[None]:
    """Within the block, every forward of ``model`` attends densely and measures every layer at every tau on the
    side, adding to ``measurements`` (layer inputs are captured for the normalisation)."""
    inputs: dict[int, torch.Tensor] = {}
    backend = "triton" if next(model.parameters()).is_cuda and HAS_TRITON else "torch"

    def measure(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        residual_norm2 = inputs.pop(module.layer_idx)
        softcap, window = kwargs.pop("softcap", None), kwargs.get("sliding_window")
        out = dense_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                            dense_backend=policy.dense_backend, dropout=dropout, is_causal=is_causal,
                            **kwargs)  # (1, L, Hq, D)
        setattr(module, STATS_ATTR, layer_statistics(module, DENSE, query.shape[2], key.shape[2]))  # it ran dense
        if window is None or key.shape[2] <= window:  # TSA never runs where a sliding window cuts the context
            _measure_layer(module, query[0], key[0], value[0], out[0], residual_norm2, scaling, softcap, policy,
                           backend, measurements[module.layer_idx])
        return out, None

    def keep_input(index):
        def hook(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = hidden[0].float().pow(2).sum(-1)  # (L,) squared norm of the residual stream
        return hook

    register_attention(_MEASURE_KEY, measure)
    previous = model.config._attn_implementation
    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True)
               for i, layer in enumerate(decoder_layers(model))]
    model.set_attn_implementation(_MEASURE_KEY)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)


@torch.no_grad()
def _measure_layer(module, query, key, value, dense, residual_norm2, scaling, softcap, policy: TsaPolicy,
                   backend: str, into: LayerMeasurement) -> None:
    """Kept fraction, weighted residual perturbation and (every row computed) attention share of this layer for
    every tau (one sequence)."""
    seq_len = key.shape[1]
    pooled = token_scores(query, key, window=policy.window, pool_kernel=policy.pool_kernel,
                          selection=policy.selection, scaling=scaling, softcap=softcap, backend=backend)  # (Hs, C)
    o_proj = module.o_proj.weight.float()  # (hidden, Hq*D)
    into.samples += 1
    previous_count, previous_error, previous_computed = None, 0.0, 1.0
    options = dict(min_tokens=policy.min_tokens, scaling=scaling, coverage=policy.coverage, softcap=softcap,
                   backend=backend)
    for i, tau in enumerate(into.taus):
        count = int(kept_count_ref(pooled, tau, policy.min_tokens, policy.coverage))
        if count != previous_count:  # the same count keeps the same top tokens: the same output, not run again
            if policy.rows == "all":
                out, _, _, cost = sparse_attention_kept_keys(query, key, value, pooled, tau=tau,
                                                             local_keys=policy.local_keys, **options)
                previous_computed = float(cost.sum())
            else:
                out, _ = sparse_attention(query, key, value, pooled, tau=tau, dense_backend=policy.dense_backend,
                                          **options)
            delta = (out.float() - dense.float()).reshape(seq_len, -1) @ o_proj.T  # (L, hidden)
            previous_error = (delta.pow(2).sum(-1) / residual_norm2.clamp_min(1e-12)).mean().item()
            previous_count = count
        into.kept[i] += (count + seq_len - pooled.shape[1]) / seq_len
        into.error[i] += previous_error
        if into.computed is not None:
            into.computed[i] += previous_computed


@torch.no_grad()  # the dense forward must not keep every layer's activations for a backward pass
def measure_layers(model, samples: list[list[int]], policy: TsaPolicy, taus: tuple[float, ...] = TAU_GRID,
                   on_sample: Callable[[], None] | None = None) -> list[LayerMeasurement]:
    """Measure every layer at every tau on ``samples`` (one dense forward each, batch 1).

    Memory: one layer's Q/K/V and one TSA output at a time, beyond the dense forward.
    """
    measurements = new_measurements(model.config.num_hidden_layers, taus)
    device = next(model.parameters()).device
    with measuring(model, measurements, policy):
        for ids in samples:
            model.model(torch.tensor([ids], device=device))
            if on_sample is not None:
                on_sample()
    return measurements
