"""The dense attention kernel underneath: SDPA with a chosen backend order, or flash-attn when installed.

TSA runs an ordinary causal kernel on the compact tensors, so its speed is the speed of the best dense kernel on
the card: "auto" puts SDPA's cuDNN backend first (at 128K on an H200, 250 ms against flash's 429).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from transformers.utils import logging

try:  # optional: flash-attn has no wheels; when a user has built it, the policy may ask for it
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None

logger = logging.get_logger(__name__)

_SDPA_ORDER = {
    "auto": ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
    "cudnn": ["CUDNN_ATTENTION"],
    "flash": ["FLASH_ATTENTION"],
    "efficient": ["EFFICIENT_ATTENTION"],
    "math": ["MATH"],
    "flash_attn": ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],  # SDPA part: as auto
}


# The flags SDPA's context manager sets, by its own names (torch.nn.attention._backend_names).
_SDP_FLAGS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "mem_efficient": "EFFICIENT_ATTENTION",
              "math": "MATH", "overrideable": "OVERRIDEABLE"}


# The backend order a TSA model's forward set for all its layers (``model_sdpa_backend``): inside it, each layer's
# ``sdpa_backend`` for that order costs one lookup.
_MODEL_ORDER: contextvars.ContextVar[str | None] = contextvars.ContextVar("tsa_model_sdpa_order", default=None)


def sdpa_backend(backend: str, device: torch.device):
    """Context that makes SDPA try the policy's backends in order (PyTorch's own choice off CUDA).

    Entering ``sdpa_kernel`` costs tens of microseconds of Python, and the runtime asks for it in every layer, so
    when SDPA is already set that way (the TSA model's forward sets it once for all its layers) this is a no-op.
    """
    if device.type != "cuda" or _MODEL_ORDER.get() == backend or _sdpa_already(backend):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in _SDPA_ORDER[backend]], set_priority=True)


@contextlib.contextmanager
def model_sdpa_backend(backend: str, device: torch.device):
    """``sdpa_backend`` around a whole model's forward, after which its layers skip the check."""
    with sdpa_backend(backend, device):
        token = _MODEL_ORDER.set(backend if device.type == "cuda" else None)
        try:
            yield
        finally:
            _MODEL_ORDER.reset(token)


def _sdpa_already(backend: str) -> bool:
    """Whether SDPA's flags and priority order are already those ``sdpa_kernel`` would set for ``backend``."""
    from torch.nn.attention import SDPBackend

    names = _SDPA_ORDER[backend]
    try:
        order = torch._C._get_sdp_priority_order()
        if [int(entry) for entry in order[: len(names)]] != [int(getattr(SDPBackend, n)) for n in names]:
            return False
        return all(getattr(torch._C, f"_get_{flag}_sdp_enabled")() == (name in names) for flag, name in _SDP_FLAGS.items())
    except AttributeError:  # a torch without these getters: always set the context
        return False


def causal_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, softcap: float | None = None
                     ) -> Tensor:
    """Dense causal attention for one sequence whose queries are the last ``Lq`` of ``Lk`` positions.

    query (Hq, Lq, D), key/value (Hs, Lk, D) with ``Hq % Hs == 0`` -> (Hq, Lq, D). The causal mask is aligned
    bottom-right (query i sees keys up to ``Lk - Lq + i``). Runs on whatever SDPA backend is active; with a
    logit ``softcap`` (Gemma 2), which SDPA cannot apply, it runs as plain PyTorch math.
    """
    q_len, kv_len = query.shape[1], key.shape[1]
    if softcap is not None:
        return softcapped_attention(query, key, value, scaling, softcap,
                                    torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len))
    gqa = query.shape[0] != key.shape[0]
    # causal_lower_right keeps SDPA on its fused kernels; a materialised (Lq, Lk) mask would not.
    mask, causal = (None, True) if q_len == kv_len else (causal_lower_right(q_len, kv_len), False)
    out = F.scaled_dot_product_attention(query[None], key[None], value[None], attn_mask=mask, is_causal=causal,
                                         scale=scaling, enable_gqa=gqa)
    return out[0]


def softcapped_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, softcap: float,
                         mask: Tensor | None) -> Tensor:
    """Attention with ``tanh`` logit capping (Gemma 2): logits ``softcap * tanh(q.k * scaling / softcap)``, softmax
    in fp32. query (..., Hq, Lq, D), key/value (..., Hs, Lk, D); ``mask`` is bool (True = attend), broadcastable
    to (..., Hq, Lq, Lk). Materialises the logits: O(Lq Lk) memory per head."""
    group = query.shape[-3] // key.shape[-3]
    key, value = key.repeat_interleave(group, dim=-3), value.repeat_interleave(group, dim=-3)
    logits = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0).to(value.dtype)  # a fully masked row gives 0
    return torch.matmul(weights, value)


def flash_causal_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, softcap: float | None = None
                           ) -> Tensor:
    """``causal_attention`` through flash-attn's ``flash_attn_func`` (bottom-right causal, native GQA)."""
    out = _flash_attn_func(query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                           softmax_scale=scaling, causal=True, softcap=softcap or 0.0)  # (1, Lq, Hq, D)
    return out[0].transpose(0, 1)


def dense_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, backend: str = "auto",
                    softcap: float | None = None) -> Tensor:
    """Causal attention with the policy's ``dense_backend`` (shapes and ``softcap`` as ``causal_attention``).

    "flash_attn" uses flash-attn on CUDA fp16/bf16 inputs when it is installed and SDPA ("auto" order)
    otherwise, with a one-time warning.
    """
    if backend == "flash_attn":
        if _flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            return flash_causal_attention(query, key, value, scaling, softcap)
        logger.warning_once("dense_backend 'flash_attn' needs flash-attn on a CUDA GPU with fp16/bf16; using SDPA.")
    with sdpa_backend(backend, query.device):
        return causal_attention(query, key, value, scaling, softcap)
