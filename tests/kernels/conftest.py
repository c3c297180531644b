"""Brute-force float64 definitions of what the TSA kernels compute, written independently of
tsa_patch/kernels/reference.py."""

from __future__ import annotations

import pytest
import torch


def brute_scores(query, key, window, scaling):
    """(Hq, Lk - W): for each candidate key, the mean over the last W queries of its causal softmax probability."""
    num_heads, _, _ = query.shape
    kv_heads, kv_len, _ = key.shape
    q, k = query.double(), key.double().repeat_interleave(num_heads // kv_heads, dim=0)
    scores = torch.zeros(num_heads, kv_len - window, dtype=torch.float64, device=query.device)
    for w in range(window):
        position = kv_len - window + w  # original position of this voting query
        logits = (q[:, q.shape[1] - window + w] [:, None, :] * k[:, : position + 1]).sum(-1) * scaling  # (Hq, pos+1)
        probs = torch.exp(logits - logits.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        scores += probs[:, : kv_len - window] / window
    return scores


def brute_restricted_attention(query, key, value, kept, scaling):
    """Dense causal attention of head h restricted to its kept set S_h; rows not in S_h are 0. float64."""
    num_heads, q_len, _ = query.shape
    kv_heads, kv_len, _ = key.shape
    group = num_heads // kv_heads
    k, v = key.double().repeat_interleave(group, 0), value.double().repeat_interleave(group, 0)
    kept_q = kept.repeat_interleave(num_heads // kept.shape[0], 0)
    device = query.device
    member = torch.zeros(num_heads, kv_len, dtype=torch.bool, device=device).scatter_(1, kept_q, True)
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    allowed = member[:, None, :] & (torch.arange(kv_len, device=device)[None, None, :] <= query_pos[None, :, None])
    logits = torch.einsum("hqd,hkd->hqk", query.double(), k) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hqk,hkd->hqd", torch.softmax(logits, -1).nan_to_num(0.0), v)
    return torch.where(member[:, query_pos, None], out, torch.zeros_like(out))


def relative_error(out, ref):
    """||out - ref|| / ||ref||, after checking that ``out`` holds no NaN or inf."""
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def brute():
    return type("Brute", (), {"scores": staticmethod(brute_scores),
                              "restricted_attention": staticmethod(brute_restricted_attention),
                              "relative_error": staticmethod(relative_error)})
