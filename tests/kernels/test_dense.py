"""tsa_patch/kernels/dense.py: bottom-right causal SDPA, the flash-attn path's layout, and the backend fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsa_patch.kernels import dense
from numerics import ATTENTION_RELATIVE, layout_atol


def _reference(q, k, v, scaling):
    """float64 causal attention, bottom-right aligned, GQA by repetition."""
    q_len, kv_len = q.shape[1], k.shape[1]
    group = q.shape[0] // k.shape[0]
    kq, vq = k.repeat_interleave(group, 0).double(), v.repeat_interleave(group, 0).double()
    logits = torch.einsum("hqd,hkd->hqk", q.double(), kq) * scaling
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.einsum("hqk,hkd->hqd", torch.softmax(logits.masked_fill(~mask, float("-inf")), -1), vq)


@pytest.mark.parametrize("q_len", [50, 33])
def test_causal_attention_is_bottom_right_aligned(q_len):
    q, k, v = torch.randn(4, q_len, 16), torch.randn(2, 50, 16), torch.randn(2, 50, 16)
    out = dense.causal_attention(q, k, v, 0.25)
    ref = _reference(q, k, v, 0.25)
    assert ((out.double() - ref).norm() / ref.norm()).item() < ATTENTION_RELATIVE[torch.float32]


def _fake_flash_attn_func(q, k, v, softmax_scale, causal, softcap=0.0):
    """flash-attn's contract: (B, L, H, D) inputs, native GQA, causal aligned bottom-right."""
    assert causal and q.dim() == 4
    q_len, kv_len = q.shape[1], k.shape[1]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("q_len", [40, 17])
def test_flash_attn_path_has_the_same_layout_and_result(monkeypatch, q_len):
    monkeypatch.setattr(dense, "_flash_attn_func", _fake_flash_attn_func)
    q, k, v = torch.randn(6, q_len, 32), torch.randn(3, 40, 32), torch.randn(3, 40, 32)
    out = dense.flash_causal_attention(q, k, v, 0.2)
    assert out.shape == (6, q_len, 32)
    expected = dense.causal_attention(q, k, v, 0.2)
    assert torch.allclose(out, expected, atol=layout_atol(expected))  # SDPA with a mask vs causal: another order


def test_flash_attn_backend_falls_back_to_sdpa_without_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(dense, "_flash_attn_func", lambda *a, **k: calls.append(1))
    q, k, v = torch.randn(2, 20, 16), torch.randn(2, 20, 16), torch.randn(2, 20, 16)
    out = dense.dense_attention(q, k, v, 0.25, "flash_attn")
    assert not calls and torch.equal(out, dense.causal_attention(q, k, v, 0.25))
