"""The transformers attention function that runs Token Sparse Attention, and its registration.

``tsa_attention_forward`` has the contract of ``transformers.integrations.sdpa_attention.sdpa_attention_forward``:
inputs (B, H, L, D) after RoPE and after the KV cache update, output (B, Lq, Hq, D) plus ``None`` weights.
It reads the per-layer policy from ``module.config`` and ``module.layer_idx`` and takes the dense SDPA path,
unchanged, for decode, short prompts, disabled layers and training. This file ships inside exported
checkpoints: it imports only torch, transformers and its flat siblings.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from .block_sparse import block_sparse_attention
from .dense import dense_attention, sdpa_backend, softcapped_attention
from .policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from .tsa import HAS_TRITON, tsa_attention

# Attribute of the attention module that holds the statistics of its last forward.
_STATS_ATTR = "_tsa_last_forward"
# Set on the attention modules of models built by the TSA classes (modeling_tsa.py) or ``apply_policy_``.
_RUNTIME_ATTR = "_tsa_runtime"
# Parsed policies, keyed by id() of the config's policy dict; the stored copy detects in-place edits.
_POLICY_CACHE: dict[int, tuple[dict, TsaPolicy]] = {}
# Off CUDA, block-sparse layers run dense attention; with this variable set to 1 they run the same block selection
# in PyTorch instead (slow, same results as the GPU kernel: what calibration and evaluation measure on a CPU).
EMULATE_BLOCK_SPARSE_ENV = "TSA_EMULATE_BLOCK_SPARSE"


def policy_from_config(config) -> TsaPolicy:
    """The validated ``TsaPolicy`` stored in ``config.tsa_policy`` (parsed once, then cached).

    Raises:
        ValueError: when the config carries no policy or an invalid one.
    """
    raw = getattr(config, CONFIG_KEY, None)
    if raw is None:
        raise ValueError(f"config has no '{CONFIG_KEY}' entry; load a tsa-patch export or call apply_policy_ first.")
    cached = _POLICY_CACHE.get(id(raw))
    if cached is None or cached[0] != raw:
        cached = (copy.deepcopy(raw), TsaPolicy.from_dict(raw))
        _POLICY_CACHE[id(raw)] = cached
    return cached[1]


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
        tsa_keep_fraction (keyword, via ``model(..., tsa_keep_fraction=f)``): benchmarks only; every sparse
            layer keeps this fraction of its candidate tokens instead of applying tau.
        tsa_block_density (keyword): benchmarks only; every block-sparse layer keeps this fraction of each query
            block's causal key blocks instead of applying ``block_gamma``.

    Returns:
        (B, Lq, Hq, D) contiguous output and ``None`` (attention weights are never materialised).
    """
    if not getattr(module, _RUNTIME_ATTR, False) and _exported_config(module.config):
        raise ValueError(f"this model was loaded from a tsa-patch export without trust_remote_code=True, as its native "
                         f"class, which runs '{ATTENTION_KEY}' only because another export loaded in this process "
                         "registered it; load it with trust_remote_code=True, or with attn_implementation=\"sdpa\" for "
                         "the dense model.")
    policy = policy_from_config(module.config)
    layer = policy.layers[module.layer_idx]
    batch, num_heads, q_len, head_dim = query.shape
    if attention_mask is None and 1 < q_len < key.shape[2]:
        # No mask with more keys than queries: a prefill into an empty static cache (transformers relies on
        # SDPA's top-left causal alignment). The queries are the first positions; the cache's tail is empty.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    kv_len = key.shape[2]
    scaling = head_dim**-0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    # A sliding-window layer only sees its window: TSA's causal selection does not apply once Lk exceeds it.
    windowed = kwargs.get("sliding_window") is not None and kv_len > kwargs["sliding_window"]

    block_backend = _block_sparse_backend(query) if layer.block_sparse and softcap is None else None
    # Dense path, unchanged: nothing to sparsify (decode, short prompts, dense or windowed layers) or training.
    if ((not layer.active and block_backend is None) or module.training or windowed or q_len < policy.window
            or kv_len < policy.activation_length):
        if q_len > 1:  # statistics describe the last prefill, not the decode steps that follow it
            setattr(module, _STATS_ATTR, _stats(module, "dense", q_len, kv_len, None))
        if softcap is not None:  # SDPA cannot cap logits (Gemma 2)
            return _softcapped_forward(query, key, value, attention_mask, scaling, softcap), None
        with sdpa_backend(policy.dense_backend, query.device):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)

    valid = _valid_keys(attention_mask, kv_len)  # (B, Lk) bool, or None when nothing is padded
    backend = "triton" if query.is_cuda and HAS_TRITON else "torch"
    outputs, kept_counts, densities = [], [], []
    # Triton launches on the current CUDA device; with accelerate's device_map the layer may live on another one.
    device = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with sdpa_backend(policy.dense_backend, query.device), device:
        # Each sequence is processed alone: it picks its own kept count, as it would outside the batch.
        for b in range(batch):
            if valid is None:
                q, k, v, rows = query[b], key[b], value[b], None
            else:
                positions = valid[b].nonzero()[:, 0]  # (n_b,) real tokens of sequence b
                # The queries end at the last real key: at Lk - 1 for a dynamic cache, earlier in a static cache
                # whose tail is still empty. Right padding starts them at 0.
                offset = max(0, int(positions[-1]) + 1 - q_len)
                positions = positions[positions < offset + q_len]
                rows = positions[positions >= offset] - offset  # its real query rows
                q, k, v = query[b][:, rows], key[b][:, positions], value[b][:, positions]
            # Block-sparse runs on full prefills only (on the compact tensors when the layer also runs TSA).
            block_density: list[float] = []
            attend = None
            if block_backend is not None and q.shape[1] == k.shape[1]:
                attend = _block_sparse_attend(policy, scaling, block_backend, kwargs.get("tsa_block_density"),
                                              block_density)
            if q.shape[1] < policy.window or k.shape[1] < policy.activation_length:
                out_b = dense_attention(q, k, v, scaling, policy.dense_backend, softcap).transpose(0, 1)  # (Lq_b, Hq, D)
                counts = None
            elif layer.active:
                out_b, kept = tsa_attention(q, k, v, tau=layer.tau, window=policy.window,
                                            pool_kernel=policy.pool_kernel, min_tokens=policy.min_tokens,
                                            selection=policy.selection, scaling=scaling, softcap=softcap,
                                            dense_backend=policy.dense_backend, backend=backend,
                                            keep_fraction=kwargs.get("tsa_keep_fraction"), attend=attend)
                counts = [kept.shape[1]] * kept.shape[0]
            else:
                out_b = (dense_attention(q, k, v, scaling, policy.dense_backend) if attend is None
                         else attend(q, k, v)).transpose(0, 1)  # (Lq_b, Hq, D)
                counts = None
            if rows is not None:  # padded: place the real rows, padded query rows stay 0
                out_b = out_b.new_zeros(q_len, num_heads, head_dim).index_copy_(0, rows, out_b)
            outputs.append(out_b)
            kept_counts.append(counts)
            densities.append(block_density[0] if block_density else None)
    setattr(module, _STATS_ATTR, _stats(module, "sparse" if layer.active else "block_sparse", q_len, kv_len,
                                        kept_counts, densities))
    out = outputs[0][None] if batch == 1 else torch.stack(outputs)  # (B, Lq, Hq, D)
    return out.contiguous(), None


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


def block_sparse_kernel_available(device: torch.device) -> bool:
    """Whether block-sparse layers run the Triton kernel on ``device`` (CUDA with Triton). Elsewhere they attend
    densely, or emulate the kernel in PyTorch when ``TSA_EMULATE_BLOCK_SPARSE=1``."""
    return device.type == "cuda" and HAS_TRITON


def _block_sparse_backend(query: Tensor) -> str | None:
    """How a block-sparse layer runs on ``query``'s device: "triton" where the kernel is available, "torch" when
    emulation is asked for elsewhere, None (dense attention) otherwise."""
    if block_sparse_kernel_available(query.device):
        return "triton"
    return "torch" if os.environ.get(EMULATE_BLOCK_SPARSE_ENV) == "1" else None


def _block_sparse_attend(policy: TsaPolicy, scaling: float, backend: str, density: float | None, record: list):
    """The policy's block-sparse kernel as an ``attend(q, k, v)`` function; appends each call's block density
    to ``record``."""

    def attend(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out, pattern = block_sparse_attention(query, key, value, gamma=policy.block_gamma, block=policy.block_size,
                                              min_budget=policy.block_min_budget,
                                              js_threshold=policy.block_js_threshold, scaling=scaling,
                                              density=density, backend=backend)
        record.append(pattern.density)
        return out

    return attend


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


def _stats(module, path: str, q_len: int, kv_len: int, kept: list | None, block_density: list | None = None) -> dict:
    return {"layer": module.layer_idx, "path": path, "query_len": q_len, "kv_len": kv_len, "kept": kept,
            "block_density": block_density}


def tsa_statistics(model: torch.nn.Module) -> list[dict]:
    """Per-layer statistics of the model's last prefill (a forward with more than one query token).

    Each dict has ``layer``, ``path`` ("sparse" for TSA, "block_sparse" for the block-sparse kernel alone, or
    "dense"), ``query_len``, ``kv_len``, ``kept``: for a TSA
    layer a list (one per sequence of the batch) of per-head kept-token counts, ``None`` for a sequence that was
    too short or not reduced; ``None`` for a dense layer; and ``block_density``: for a block-sparse layer a list
    (one per sequence) of the kept fraction of the causal block map, ``None`` where the kernel did not run.
    """
    found = [getattr(m, _STATS_ATTR) for m in model.modules() if hasattr(m, _STATS_ATTR)]
    return sorted(found, key=lambda s: s["layer"])


def attention_summary(statistics: list[dict], sequence: int = 0) -> dict:
    """What one sequence's last prefill computed, from ``tsa_statistics``.

    Returns a dict with ``tsa_layers`` and ``block_sparse_layers`` (how many layers reduced the sequence),
    ``kept_fraction`` (mean kept fraction of tokens over the TSA layers, 1.0 without any), ``block_density``
    (mean over the block-sparse layers, 1.0 without any) and ``attention_cost`` (the computed fraction of dense
    causal attention FLOPs, averaged over all layers: ``kept_fraction ** 2 * block_density`` per layer).
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
        costs.append(fraction**2 * (1.0 if density is None else density))
    return {"tsa_layers": len(kept), "block_sparse_layers": len(densities),
            "kept_fraction": sum(kept) / len(kept) if kept else 1.0,
            "block_density": sum(densities) / len(densities) if densities else 1.0,
            "attention_cost": sum(costs) / len(costs) if costs else 1.0}


def register_tsa_attention() -> None:
    """Register ``tsa_attention_forward`` and its mask function under ``ATTENTION_KEY`` (idempotent).

    Both registrations are needed: transformers silently passes ``attention_mask=None`` to an attention
    function whose key has no registered mask function, losing padding and causality.
    """
    AttentionInterface.register(ATTENTION_KEY, tsa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_KEY, sdpa_mask)
