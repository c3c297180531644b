"""kernels/reference.py against brute-force float64 definitions, on fresh random inputs.

Bounds: float32 paths must be within 1e-5 relative error of float64 (fp32 arithmetic lands far below 1e-5 at
these sizes); bf16 inputs must be within 2x the error plain torch makes on the same bf16 inputs. NaN fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsa_patch.kernels.reference import (
    causal_attention_ref,
    gather_rows_ref,
    scatter_rows_ref,
    score_keys_ref,
    select_tokens_ref,
    tsa_attention_ref,
)

SHAPES = [  # (Hq, Hkv, Lk, D, W): odd lengths, GQA, MHA, MQA
    (4, 2, 97, 32, 16),
    (6, 3, 200, 64, 32),
    (3, 3, 131, 16, 8),
    (4, 1, 64, 64, 8),
]


def _ids(shape):
    return "Hq{}-Hkv{}-L{}-D{}-W{}".format(*shape)


def _qkv(hq, hkv, lk, d, lq=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lq = lk if lq is None else lq
    q = torch.randn(hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(hkv, lk, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_score_keys_matches_softmax_mean(shape, brute):
    hq, hkv, lk, d, w = shape
    q, k, _ = _qkv(hq, hkv, lk, d, seed=lk)
    scores = score_keys_ref(q, k, w, d**-0.5)
    assert scores.shape == (hq, lk - w) and scores.dtype == torch.float32
    assert brute.relative_error(scores, brute.scores(q, k, w, d**-0.5)) < 1e-5
    # each voting query's probabilities over candidates sum to at most 1, so the mean does too
    assert (scores.sum(-1) <= 1 + 1e-5).all()


def _expected_keep(scores, tau, pool_kernel, min_tokens):
    """Independent DTC: smoothed, per-head normalised distributions, their mean, and the kept count K."""
    kernel = torch.ones(1, 1, pool_kernel, dtype=torch.float64) / pool_kernel
    pooled = F.conv1d(scores.double()[:, None], kernel, padding=pool_kernel // 2)[:, 0]
    dist = pooled / pooled.sum(-1, keepdim=True)
    tail = torch.sort(dist.mean(0)).values.cumsum(0)
    candidates = scores.shape[1]
    return dist, min(candidates, max(min_tokens, candidates - int((tail < tau).sum())))


@pytest.mark.parametrize("tau", [0.0, 0.005, 0.05, 0.3])
@pytest.mark.parametrize("min_tokens", [0, 40])
def test_select_tokens_invariants(tau, min_tokens):
    gen = torch.Generator().manual_seed(int(tau * 1000) + min_tokens)
    heads, candidates, window, pool = 5, 301, 24, 7
    scores = torch.rand(heads, candidates, generator=gen) ** 8  # peaky, like attention
    kept = select_tokens_ref(scores, candidates + window, tau, pool, min_tokens)
    dist, keep = _expected_keep(scores, tau, pool, min_tokens)

    assert kept.dtype == torch.int64 and kept.shape == (heads, keep + window)
    assert (kept[:, 1:] > kept[:, :-1]).all(), "indices must be strictly ascending"
    assert (kept[:, keep:] == torch.arange(candidates, candidates + window)).all(), "the window is always kept"
    assert keep >= min(min_tokens, candidates)
    kept_mass = dist.gather(1, kept[:, :keep]).sum(-1).mean().item()
    assert kept_mass >= 1 - tau - 1e-9, "head-averaged kept mass must be at least 1 - tau"
    # each head keeps exactly its own top-K (random continuous inputs have no ties)
    top = dist.topk(keep, -1).indices.sort(-1).values
    assert torch.equal(kept[:, :keep], top)
    if tau == 0.0:
        assert keep == candidates


def test_gather_scatter_roundtrip():
    x = torch.randn(3, 50, 8)
    idx = torch.stack([torch.randperm(50)[:20].sort().values for _ in range(3)])
    rows = gather_rows_ref(x, idx)
    assert torch.equal(rows[1, 4], x[1, idx[1, 4]])
    full = scatter_rows_ref(rows, idx, 50)
    member = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(full[member], x[member]) and (full[~member] == 0).all()


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("q_len", ["full", "chunk"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_tsa_attention_equals_dense_restricted_to_kept(shape, q_len, selection, brute):
    hq, hkv, lk, d, w = shape
    lq = lk if q_len == "full" else lk // 2 + 3
    q, k, v = _qkv(hq, hkv, lk, d, lq=lq, seed=7 * lk + lq)
    out, kept = tsa_attention_ref(q, k, v, tau=0.2, window=w, pool_kernel=7, min_tokens=8, selection=selection,
                                  scaling=d**-0.5)
    assert kept.shape[0] == (hq if selection == "query_head" else hkv)
    assert kept.shape[1] < lk, "tau = 0.2 must drop tokens at these sizes"
    ref = brute.restricted_attention(q, k, v, kept, d**-0.5)
    assert out.shape == (hq, lq, d)
    assert brute.relative_error(out, ref) < 1e-5
    # rows dropped by a head are exactly zero for that head
    kept_q = kept.repeat_interleave(hq // kept.shape[0], 0)
    member = torch.zeros(hq, lk, dtype=torch.bool).scatter_(1, kept_q, True)[:, lk - lq :]
    assert (out[~member] == 0).all() and (~member).any()


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
def test_tsa_attention_bf16_within_twice_torch_error(selection, brute):
    hq, hkv, lk, d, w = 4, 2, 257, 64, 32
    q, k, v = _qkv(hq, hkv, lk, d, seed=3)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, kept = tsa_attention_ref(qb, kb, vb, tau=0.1, window=w, pool_kernel=7, min_tokens=16, selection=selection,
                                  scaling=d**-0.5)
    assert out.dtype == torch.bfloat16 and kept.shape[1] < lk
    truth = brute.restricted_attention(qb, kb, vb, kept, d**-0.5)  # float64 math on the bf16 inputs
    # what plain torch achieves in bf16 on the same kept set: dense SDPA under the restricted mask
    torch_bf16 = _plain_bf16_restricted(qb, kb, vb, kept, d**-0.5)
    assert brute.relative_error(out, truth) <= 2 * brute.relative_error(torch_bf16, truth)


def _plain_bf16_restricted(q, k, v, kept, scaling):
    hq, lk = q.shape[0], k.shape[1]
    kq, vq = k.repeat_interleave(hq // k.shape[0], 0), v.repeat_interleave(hq // v.shape[0], 0)
    kept_q = kept.repeat_interleave(hq // kept.shape[0], 0)
    member = torch.zeros(hq, lk, dtype=torch.bool).scatter_(1, kept_q, True)
    allowed = member[:, None, :] & torch.ones(lk, lk, dtype=torch.bool).tril()
    allowed |= torch.eye(lk, dtype=torch.bool)  # keep dropped rows finite; they are zeroed below
    out = F.scaled_dot_product_attention(q, kq, vq, attn_mask=allowed, scale=scaling)
    return torch.where(member[:, :, None], out, torch.zeros_like(out))


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
def test_tau_zero_equals_dense(selection, brute):
    hq, hkv, lk, d, w = 6, 2, 150, 32, 16
    q, k, v = _qkv(hq, hkv, lk, d, seed=11)
    out, kept = tsa_attention_ref(q, k, v, tau=0.0, window=w, pool_kernel=7, min_tokens=0, selection=selection,
                                  scaling=d**-0.5)
    assert kept.shape[1] == lk
    dense = causal_attention_ref(q, k, v, d**-0.5)
    assert torch.allclose(out, dense, atol=1e-6, rtol=0)


def test_compressed_attention_is_causal():
    """Changing a kept token's value changes no output row before it (selection reads only Q and K)."""
    hq, hkv, lk, d, w = 4, 2, 120, 32, 16
    q, k, v = _qkv(hq, hkv, lk, d, seed=5)
    kw = dict(tau=0.2, window=w, pool_kernel=7, min_tokens=8, selection="query_head", scaling=d**-0.5)
    out, kept = tsa_attention_ref(q, k, v, **kw)
    position = int(kept[0, kept.shape[1] // 2])
    v2 = v.clone()
    v2[:, position] += 10.0
    out2, kept2 = tsa_attention_ref(q, k, v2, **kw)
    assert torch.equal(kept, kept2)
    assert torch.equal(out[:, :position], out2[:, :position])
    assert not torch.equal(out[0, position], out2[0, position])
