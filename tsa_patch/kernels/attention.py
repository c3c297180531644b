"""The transformers attention function that runs Token Sparse Attention, and its registration.

``tsa_attention_forward`` has the contract of ``transformers.integrations.sdpa_attention.sdpa_attention_forward``:
inputs (B, H, L, D) after RoPE and after the KV cache update, output (B, Lq, Hq, D) plus ``None`` weights.
It reads the per-layer policy from ``module.config`` and ``module.layer_idx``; ``layer_path`` decides, for the
batch and for each of its sequences, whether the layer attends densely (decode, short prompts, dense, windowed
or training layers: SDPA unchanged), runs TSA, or runs the block-sparse kernel alone. This file ships inside
exported checkpoints: it imports only torch, transformers and its flat siblings.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .block_sparse import block_sparse_prefill
from .dense import dense_attention, sdpa_backend, softcapped_attention
from .policy import ATTENTION_KEY, CONFIG_KEY, LayerPolicy, TsaPolicy
from .tsa import HAS_TRITON, tsa_attention, tsa_attention_kept_keys, tsa_attention_sync_free

# Attribute of the attention module that holds the statistics of its last forward (``tsa_statistics``).
STATS_ATTR = "_tsa_last_forward"
# Set on the attention modules of models built by the TSA classes (modeling_tsa.py) or ``apply_policy_``.
_RUNTIME_ATTR = "_tsa_runtime"
# Attention-module attribute set by ``emulate_block_sparse_``.
_EMULATE_ATTR = "_tsa_emulate_block_sparse"
# Parsed policies, keyed by id() of the config's policy dict: (the dict itself, a copy that detects in-place edits,
# the policy). Holding the dict keeps its id from being reused by a new dict while the entry exists (a new policy
# at a recycled id would otherwise be served the old one's policy); the oldest entries are dropped beyond the size.
_POLICY_CACHE: dict[int, tuple[dict, dict, TsaPolicy]] = {}
_POLICY_CACHE_SIZE = 16
# The paths a layer can take on one forward (``layer_path``).
DENSE, SPARSE, BLOCK_SPARSE = "dense", "sparse", "block_sparse"


def policy_from_config(config, recheck: bool = True) -> TsaPolicy:
    """The validated ``TsaPolicy`` stored in ``config.tsa_policy`` (parsed once, then cached).

    ``recheck=False`` skips comparing the dict with the cached copy (an in-place edit is then seen at the next
    call that rechecks): the runtime rechecks in the first layer of each forward only, which keeps the per-layer
    cost of a dense layer low.

    Raises:
        ValueError: when the config carries no policy or an invalid one.
    """
    raw = vars(config).get(CONFIG_KEY) if hasattr(config, "__dict__") else None  # skips a config's __getattribute__
    if raw is None:
        raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        raise ValueError(f"config has no '{CONFIG_KEY}' entry; load a tsa-patch export or call apply_policy_ first.")
    cached = _POLICY_CACHE.get(id(raw))
    if cached is None or cached[0] is not raw or (recheck and cached[1] != raw):
        cached = (raw, copy.deepcopy(raw), TsaPolicy.from_dict(raw))
        _POLICY_CACHE.pop(id(raw), None)
        _POLICY_CACHE[id(raw)] = cached
        while len(_POLICY_CACHE) > _POLICY_CACHE_SIZE:
            _POLICY_CACHE.pop(next(iter(_POLICY_CACHE)))
    return cached[2]


@dataclass(frozen=True)
class _Call:
    """What every sequence of one call needs besides its tensors (from the policy and the keyword arguments)."""

    policy: TsaPolicy
    layer: LayerPolicy
    scaling: float
    softcap: float | None
    block_backend: str | None  # how block-sparse layers run here ("triton", "torch" or None: dense)
    keep_fraction: float | None  # benchmarks only
    block_density: float | None  # benchmarks only
    sync_free: bool | None  # None: only while a CUDA graph is being captured (``_sync_free``)


def layer_path(policy: TsaPolicy, layer: LayerPolicy, q_len: int, kv_len: int, block_backend: str | None) -> str:
    """``DENSE``, ``SPARSE`` (TSA, on the block-sparse kernel when the layer has it) or ``BLOCK_SPARSE`` (the
    block-sparse kernel alone) for ``q_len`` queries over ``kv_len`` keys.

    Short inputs attend densely: fewer queries than the scoring window, or fewer keys than the layer's activation
    length (``TsaPolicy.activation_of``).
    The block-sparse kernel runs on full prefills only (``q_len == kv_len``) and where ``block_backend`` is set.
    """
    if q_len < policy.window or kv_len < policy.activation_of(layer):
        return DENSE
    if layer.active:
        return SPARSE
    if layer.block_sparse and block_backend is not None and q_len == kv_len:
        return BLOCK_SPARSE
    return DENSE


def dense_everywhere(policy: TsaPolicy, q_len: int, kv_len: int) -> bool:
    """Whether ``layer_path`` is ``DENSE`` in every layer for ``q_len`` queries over ``kv_len`` keys, even where the
    block-sparse kernel can run: then a TSA model's forward runs transformers' own SDPA path, with none of this
    module's Python in its layers."""
    return all(layer_path(policy, layer, q_len, kv_len, "triton") == DENSE for layer in policy.layers)


def tsa_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Token Sparse Attention for one decoder layer (transformers ``AttentionInterface`` contract).

    Args:
        module: the model's attention module (gives ``config``, ``layer_idx``, ``training``).
        query: (B, Hq, Lq, D) after RoPE.
        key, value: (B, Hkv, Lk, D), the whole KV cache after its update; ``Lq <= Lk``.
        attention_mask: ``sdpa_mask`` output: bool (B, 1, Lq, Lk) with True = attend, or None for an unpadded
            causal prefill and for decode.
        dropout, scaling, is_causal: as for ``sdpa_attention_forward``.
        tsa_keep_fraction (keyword): benchmarks only; every sparse layer keeps this fraction of its candidate
            tokens instead of applying tau.
        tsa_block_density (keyword): benchmarks only; every block-sparse layer keeps this fraction of each query
            block's causal key blocks instead of applying ``block_gamma``.
        tsa_sync_free (keyword): True runs TSA's full prefills on CUDA without a host synchronisation
            (``tsa.tsa_attention_sync_free``), False with one (``tsa.tsa_attention``); None (the default) takes
            the sync-free path only while a CUDA graph is being captured, where a sync is an error: the synced
            path is the faster one in eager mode at every length measured (benchmarks/README.md, "Sync-free path").

    Returns:
        (B, Lq, Hq, D) contiguous output and ``None`` (attention weights are never materialised).
    """
    if not module.__dict__.get(_RUNTIME_ATTR, False) and _exported_config(module.config):
        raise ValueError(f"this model was loaded from a tsa-patch export without trust_remote_code=True, as its native "
                         f"class, which runs '{ATTENTION_KEY}' only because another export loaded in this process "
                         "registered it; load it with trust_remote_code=True, or with attn_implementation=\"sdpa\" for "
                         "the dense model.")
    policy = policy_from_config(module.config, recheck=module.layer_idx == 0)
    layer = policy.layers[module.layer_idx]
    key, value = _filled_prefix(query, key, value, attention_mask)
    q_len, kv_len = query.shape[2], key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.pop("softcap", None)
    block_backend = None  # soft-capped layers never run the block-sparse kernel: it cannot cap logits
    if layer.block_sparse and softcap is None:
        block_backend = _block_sparse_backend(query.device, module.__dict__.get(_EMULATE_ATTR, False))
    # A sliding-window layer only sees its window: TSA's causal selection does not apply once Lk exceeds it.
    windowed = kwargs.get("sliding_window") is not None and kv_len > kwargs["sliding_window"]
    path = DENSE if module.training or windowed else layer_path(policy, layer, q_len, kv_len, block_backend)
    if path == DENSE:  # the common case (decode, short prompts, dense layers): as little Python as possible
        if q_len > 1:  # statistics describe the last prefill, not the decode steps that follow it
            module.__dict__[STATS_ATTR] = layer_statistics(module, DENSE, q_len, kv_len)  # plain dict: no Module hooks
        return dense_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                             dense_backend=policy.dense_backend, dropout=dropout, is_causal=is_causal, **kwargs), None

    call = _Call(policy=policy, layer=layer, scaling=scaling, softcap=softcap, block_backend=block_backend,
                 keep_fraction=kwargs.get("tsa_keep_fraction"), block_density=kwargs.get("tsa_block_density"),
                 sync_free=kwargs.get("tsa_sync_free"))
    outputs, kept, densities, costs = [], [], [], []
    with sdpa_backend(policy.dense_backend, query.device), _launch_device(query):
        # Each sequence is processed alone: it picks its own kept count, as it would outside the batch.
        for q, k, v, rows in _unpadded_sequences(query, key, value, attention_mask):
            out, counts, density, cost = _sequence_forward(call, q, k, v)  # out (Lq_b, Hq, D)
            if rows is not None:  # padded: place the real rows; padded query rows stay 0
                out = out.new_zeros(q_len, *out.shape[1:]).index_copy_(0, rows, out)
            outputs.append(out)
            kept.append(counts)
            densities.append(density)
            costs.append(cost)
    module.__dict__[STATS_ATTR] = layer_statistics(module, path, q_len, kv_len, kept, densities, costs)
    out = outputs[0][None] if len(outputs) == 1 else torch.stack(outputs)  # (B, Lq, Hq, D)
    return out.contiguous(), None


def _sequence_forward(call: _Call, query: Tensor, key: Tensor, value: Tensor
                      ) -> tuple[Tensor, list[int] | Tensor | None, Tensor | None, Tensor | None]:
    """One unpadded sequence, query (Hq, Lq, D), key/value (Hkv, Lk, D): its output (Lq, Hq, D), the kept count of
    each selecting head (None unless TSA ran; a device tensor on the sync-free paths), the block density (a 0-dim
    device tensor; None unless the block-sparse kernel ran) and the share of dense attention computed (a device
    tensor, the sum of its parts, where every row attended to the kept keys; None elsewhere)."""
    path = layer_path(call.policy, call.layer, query.shape[1], key.shape[1], call.block_backend)
    block_density: list[Tensor] = []
    attend = None
    if call.layer.block_sparse and call.block_backend is not None and query.shape[1] == key.shape[1]:
        attend = _block_sparse_attend(call, block_density)
    if path == DENSE:
        dense = dense_attention(query, key, value, call.scaling, call.policy.dense_backend, call.softcap)
        return dense.transpose(0, 1), None, None, None
    if path == BLOCK_SPARSE:
        return attend(query, key, value).transpose(0, 1), None, block_density[0], None
    policy, backend = call.policy, _stage_backend(query)
    options = dict(tau=call.layer.tau, window=policy.window, pool_kernel=policy.pool_kernel,
                   min_tokens=policy.min_tokens, selection=policy.selection, scaling=call.scaling,
                   coverage=policy.coverage, softcap=call.softcap, keep_fraction=call.keep_fraction, backend=backend)
    full_prefill = query.shape[1] == key.shape[1]
    if attend is None and full_prefill and policy.rows == "all":
        out, _, count, cost = tsa_attention_kept_keys(query, key, value, local_keys=policy.local_keys, **options)
        return out, count, None, cost  # the cost stays on the device, read when asked
    if attend is None and backend == "triton" and full_prefill and _sync_free(call):
        out, _, count = tsa_attention_sync_free(query, key, value, **options)
        return out, count, None, None  # the counts stay on the device; tsa_statistics reads them when asked
    out, kept = tsa_attention(query, key, value, dense_backend=policy.dense_backend, attend=attend, **options)
    return out, [kept.shape[1]] * kept.shape[0], block_density[0] if block_density else None, None


def _sync_free(call: _Call) -> bool:
    """Whether a TSA full prefill on CUDA keeps its kept count on the device: as the caller asked, else only while
    a CUDA graph is being captured (a host sync would break the capture)."""
    return torch.cuda.is_current_stream_capturing() if call.sync_free is None else call.sync_free


def mark_tsa_runtime_(model: torch.nn.Module) -> torch.nn.Module:
    """Mark the attention modules of ``model`` as built to run TSA (by the remote-code classes or
    ``apply_policy_``); ``tsa_attention_forward`` refuses an export's config on unmarked modules."""
    for module in model.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, _RUNTIME_ATTR, True)
    return model


def _exported_config(config) -> bool:
    """True for the config of a tsa-patch export (its auto_map names modeling_tsa, maybe after "org/repo--")."""
    auto_map = getattr(config, "auto_map", None)
    return isinstance(auto_map, dict) and any(
        isinstance(ref, str) and ref.split("--")[-1].startswith("modeling_tsa.") for ref in auto_map.values())


def dense_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  *, scaling: float, softcap: float | None = None, dense_backend: str = "auto", dropout: float = 0.0,
                  is_causal: bool | None = None, **kwargs) -> Tensor:
    """A layer's dense attention, (B, Lq, Hq, D): transformers' SDPA path with the policy's backend order, or the
    soft-capped math path (Gemma 2's logit cap, which SDPA cannot apply). Used by the runtime and calibration."""
    if softcap is not None:
        return _softcapped_forward(query, key, value, attention_mask, scaling, softcap)
    with sdpa_backend(dense_backend, query.device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)[0]


def _filled_prefix(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The keys that hold tokens. Without a mask and with more keys than queries, transformers is prefilling an
    empty static cache (relying on SDPA's top-left causal alignment): the queries are the first positions and the
    cache's tail is empty."""
    q_len = query.shape[2]
    if attention_mask is None and 1 < q_len < key.shape[2]:
        return key[:, :, :q_len], value[:, :, :q_len]
    return key, value


def _unpadded_sequences(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None):
    """Yield each sequence of the batch without its padding: q (Hq, Lq_b, D), k and v (Hkv, Lk_b, D), and the
    real query rows (Lq_b,) in the padded output, or None when nothing is padded."""
    kv_len, q_len = key.shape[2], query.shape[2]
    valid = _valid_keys(attention_mask, kv_len)  # (B, Lk) bool, or None when nothing is padded
    for b in range(query.shape[0]):
        if valid is None:
            yield query[b], key[b], value[b], None
            continue
        positions = valid[b].nonzero()[:, 0]  # (n_b,) real tokens of sequence b
        # The queries end at the last real key: at Lk - 1 for a dynamic cache, earlier in a static cache whose tail
        # is still empty. Right padding starts them at 0.
        offset = max(0, int(positions[-1]) + 1 - q_len)
        positions = positions[positions < offset + q_len]
        rows = positions[positions >= offset] - offset  # its real query rows
        yield query[b][:, rows], key[b][:, positions], value[b][:, positions], rows


def _valid_keys(attention_mask: Tensor | None, kv_len: int) -> Tensor | None:
    """(B, Lk) bool of real (non-padding) keys, read off the last query row of the 4-D mask; None if unpadded.

    The last query row sees every real key under left padding (it is the newest real token), under right
    padding (``sdpa_mask`` masks padded keys, not padded queries), and in a static cache (whose empty tail it
    does not see), so it is the padding mask of the keys.
    """
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, -kv_len:]  # (B, Lk)
    if last_row.dtype != torch.bool:  # additive float mask: 0 = attend, very negative = masked
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return None if bool(last_row.all()) else last_row


def _softcapped_forward(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scaling: float,
                        softcap: float) -> Tensor:
    """Dense attention with a logit cap, (B, Lq, Hq, D): the dense path of Gemma 2 layers."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[..., -kv_len:]
    else:  # additive float mask
        mask = attention_mask[..., -kv_len:] > torch.finfo(attention_mask.dtype).min / 2
    return softcapped_attention(query, key, value, scaling, softcap, mask).transpose(1, 2).contiguous()


def _launch_device(query: Tensor):
    """Triton launches on the current CUDA device; with accelerate's device_map the layer may live on another one."""
    return torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()


def _stage_backend(query: Tensor) -> str:
    """The TSA stages to use: the Triton kernels on CUDA when Triton is installed, the PyTorch reference elsewhere."""
    return "triton" if query.is_cuda and HAS_TRITON else "torch"


def block_sparse_kernel_available(device: torch.device) -> bool:
    """Whether block-sparse layers run the Triton kernel on ``device`` (CUDA with Triton). Elsewhere they attend
    densely, or emulate the kernel in PyTorch after ``emulate_block_sparse_``."""
    return device.type == "cuda" and HAS_TRITON


def emulate_block_sparse_(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Where the block-sparse Triton kernel cannot run (no CUDA), make ``model``'s block-sparse layers run its
    block selection in PyTorch (slow; what a GPU computes) instead of dense attention; ``enabled=False`` undoes it.
    Calibration and evaluation measure block-sparse layers so on a CPU."""
    for module in model.modules():
        if hasattr(module, "layer_idx"):
            setattr(module, _EMULATE_ATTR, enabled)
    return model


@contextlib.contextmanager
def block_sparse_emulation(model: torch.nn.Module, enabled: bool = True):
    """``emulate_block_sparse_(model, enabled)`` within the block; afterwards the layers attend as before."""
    modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    previous = [getattr(m, _EMULATE_ATTR, False) for m in modules]
    emulate_block_sparse_(model, enabled)
    try:
        yield model
    finally:
        for module, flag in zip(modules, previous):
            setattr(module, _EMULATE_ATTR, flag)


def _block_sparse_backend(device: torch.device, emulate: bool) -> str | None:
    """How block-sparse layers run on ``device``: "triton" where the kernel is available, "torch" when emulation is
    asked for elsewhere, None (dense attention) otherwise."""
    if block_sparse_kernel_available(device):
        return "triton"
    return "torch" if emulate else None


def _block_sparse_attend(call: _Call, record: list):
    """The policy's block-sparse kernel as an ``attend(q, k, v)`` function; appends each call's block density
    to ``record``, as a device tensor (a host sync per layer would drain the launch queue; ``tsa_statistics``
    reads it when asked)."""
    policy = call.policy

    def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out, pattern = block_sparse_prefill(query, key, value, gamma=policy.block_gamma, block=policy.block_size,
                                            min_budget=policy.block_min_budget,
                                            js_threshold=policy.block_js_threshold, scaling=call.scaling,
                                            density=call.block_density, backend=call.block_backend)
        record.append(pattern.density_on_device())
        return out

    return attend


def layer_statistics(module, path: str, q_len: int, kv_len: int, kept: list | None = None,
                     block_density: list | None = None, attention_cost: list | None = None) -> dict:
    """The statistics entry of one layer's forward (what ``tsa_statistics`` lists)."""
    return {"layer": module.layer_idx, "path": path, "query_len": q_len, "kv_len": kv_len, "kept": kept,
            "block_density": block_density, "attention_cost": attention_cost}


def record_dense_forward(modules: list[torch.nn.Module], q_len: int, kv_len: int) -> None:
    """The statistics of a forward that ran transformers' SDPA path in every layer (``dense_everywhere``)."""
    if q_len > 1:  # as tsa_attention_forward: statistics describe the last prefill
        for module in modules:
            module.__dict__[STATS_ATTR] = layer_statistics(module, DENSE, q_len, kv_len)


def tsa_statistics(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics of the model's last prefill (a forward with more than one query token).

    Each dict has ``layer``, ``path`` ("sparse" for TSA, "block_sparse" for the block-sparse kernel alone, or
    "dense"), ``query_len``, ``kv_len``, ``kept``: for a TSA
    layer a list (one per sequence of the batch) of per-head kept-token counts, ``None`` for a sequence that was
    too short or not reduced; ``None`` for a dense layer; and ``block_density``: for a block-sparse layer a list
    (one per sequence) of the kept fraction of the causal block map, ``None`` where the kernel did not run;
    ``attention_cost``: a list (one per sequence) of the share of dense causal attention the layer computed where
    every query row attended to the kept keys (``rows="all"``), ``None`` elsewhere.
    """
    found = [getattr(m, STATS_ATTR) for m in model.modules() if hasattr(m, STATS_ATTR)]
    for stats in found:  # the sync-free paths leave their counts and densities on the device: read them now
        if stats["kept"] is not None:
            stats["kept"] = [c.tolist() if isinstance(c, Tensor) else c for c in stats["kept"]]
        for name in ("block_density", "attention_cost"):
            if stats.get(name) is not None:
                stats[name] = [float(d.sum()) if isinstance(d, Tensor) else d for d in stats[name]]
    return sorted(found, key=lambda s: s["layer"])


def attention_summary(statistics: list[dict], sequence: int = 0) -> dict:
    """What one sequence's last prefill computed, from ``tsa_statistics``.

    Returns a dict with ``tsa_layers`` and ``block_sparse_layers`` (how many layers reduced the sequence),
    ``kept_fraction`` (mean kept fraction of tokens over the TSA layers, 1.0 without any), ``block_density``
    (mean over the block-sparse layers, 1.0 without any) and ``attention_cost`` (the computed fraction of dense
    causal attention FLOPs, averaged over all layers: ``kept_fraction ** 2 * block_density`` per layer, or the
    measured share where every query row attended to the kept keys).
    """
    kept, densities, costs = [], [], []
    for s in statistics:
        counts = s["kept"][sequence] if s["kept"] else None
        density = s["block_density"][sequence] if s.get("block_density") else None
        fraction = sum(counts) / len(counts) / s["kv_len"] if counts else 1.0
        if counts:
            kept.append(fraction)
        if density is not None:
            densities.append(density)
        measured = s["attention_cost"][sequence] if s.get("attention_cost") else None
        costs.append(measured if measured is not None else fraction**2 * (1.0 if density is None else density))
    return {"tsa_layers": len(kept), "block_sparse_layers": len(densities),
            "kept_fraction": sum(kept) / len(kept) if kept else 1.0,
            "block_density": sum(densities) / len(densities) if densities else 1.0,
            "attention_cost": sum(costs) / len(costs) if costs else 1.0}


def register_attention(key: str, function) -> None:
    """Register an attention function under ``key`` together with SDPA's mask function (idempotent).

    Both registrations are needed: transformers silently passes ``attention_mask=None`` to an attention function
    whose key has no registered mask function, losing padding and causality.
    """
    AttentionInterface.register(key, function)
    AttentionMaskInterface.register(key, sdpa_mask)


def register_tsa_attention() -> None:
    """Register ``tsa_attention_forward`` and its mask function under ``ATTENTION_KEY`` (idempotent)."""
    register_attention(ATTENTION_KEY, tsa_attention_forward)
