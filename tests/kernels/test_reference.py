"""The PyTorch stages of tsa_patch/kernels/reference.py against brute-force float64 definitions, on fresh random inputs.

Bound: float32 stages must be within ``numerics.ATTENTION_RELATIVE[float32]`` (128 eps) relative error of
float64 (fp32 arithmetic lands far below that at these sizes). NaN fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import ATTENTION_RELATIVE, eps

from tsa_patch.kernels.reference import (
    compress_ref,
    decompress_ref,
    kept_count_ref,
    query_rows,
    score_keys_ref,
    select_tokens_padded_ref,
    smooth_scores_ref,
)

FP32 = ATTENTION_RELATIVE[torch.float32]

SHAPES = [  # (Hq, Hkv, Lk, D, W): odd lengths, GQA, MHA, MQA
    (4, 2, 97, 32, 16),
    (6, 3, 200, 64, 32),
    (3, 3, 131, 16, 8),
    (4, 1, 64, 64, 8),
]


def shape_id(shape):
    return "Hq{}-Hkv{}-L{}-D{}-W{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_score_keys_matches_softmax_mean(shape, brute):
    hq, hkv, lk, d, w = shape
    q, k = torch.randn(hq, lk, d), torch.randn(hkv, lk, d)
    scores = score_keys_ref(q, k, w, d**-0.5)
    assert scores.shape == (hq, lk - w) and scores.dtype == torch.float32
    assert brute.relative_error(scores, brute.scores(q, k, w, d**-0.5)) < FP32
    assert (scores.sum(-1) <= 1 + FP32).all()  # each voting query's probabilities sum to at most 1


def _expected_keep(scores, tau, pool_kernel, min_tokens, coverage):
    """Independent DTC in float64, written from the rules' definitions: the pooled scores, per-head distributions,
    and the kept count K (the authors' loop of reference/paper.md section 3.3 for "paper")."""
    kernel = torch.ones(1, 1, pool_kernel, dtype=torch.float64) / pool_kernel
    pooled = F.conv1d(scores.double()[:, None], kernel, padding=pool_kernel // 2)[:, 0]
    dist = pooled / pooled.sum(-1, keepdim=True)
    candidates = scores.shape[1]
    if coverage == "paper":
        mean = pooled.mean(0)
        tail = torch.sort(mean / mean.sum()).values.cumsum(0)
        dropped = int((tail < tau).sum())
        dropped = dropped + 1 if dropped else 0  # the authors drop one more token (mass >= tau), none when n = 0
    else:
        tail = torch.sort(dist.mean(0)).values.cumsum(0)
        dropped = int((tail < tau).sum())
    return pooled, dist, min(candidates, max(min_tokens, candidates - dropped))


@pytest.mark.parametrize("coverage", ["paper", "normalized"])
@pytest.mark.parametrize("tau", [0.0, 0.005, 0.05, 0.3])
@pytest.mark.parametrize("min_tokens", [0, 40])
def test_select_tokens_invariants(tau, min_tokens, coverage):
    heads, candidates, window, pool = 5, 301, 24, 7
    scores = torch.rand(heads, candidates) ** 8 * torch.rand(heads, 1)  # peaky, like attention; heads of any mass
    pooled = smooth_scores_ref(scores, pool)
    kept = synced_selection(pooled, candidates + window, tau, min_tokens, coverage)
    expected_pooled, dist, keep = _expected_keep(scores, tau, pool, min_tokens, coverage)
    assert torch.allclose(pooled.double(), expected_pooled, rtol=FP32, atol=0)

    assert kept.dtype == torch.int64 and kept.shape == (heads, keep + window)
    assert (kept[:, 1:] > kept[:, :-1]).all(), "indices must be strictly ascending"
    assert (kept[:, keep:] == torch.arange(candidates, candidates + window)).all(), "the tail is always kept"
    assert keep >= min(min_tokens, candidates)
    if coverage == "normalized":
        kept_mass = dist.gather(1, kept[:, :keep]).sum(-1).mean().item()
        # dist is float64 (the fp32 ranking only decides which tokens): a sum of ~C float64 terms, a few eps64 short
        assert kept_mass >= 1 - tau - 64 * eps(torch.float64), "head-averaged kept mass must be at least 1 - tau"
    # each head keeps its own top-K: the same mass as the float64 top-K (near-ties may swap equal-mass tokens)
    best = dist.topk(keep, -1).values.sum(-1)
    # fp32 and float64 rankings may swap two tokens whose masses differ by fp32 rounding of the distribution
    assert torch.allclose(dist.gather(1, kept[:, :keep]).sum(-1), best, rtol=8 * eps(torch.float32), atol=0)
    if tau == 0.0:
        assert keep == candidates


def test_paper_rule_weighs_heads_by_their_mass_and_drops_one_more():
    """The authors average raw scores (a head with little mass on the candidates counts little) and drop n + 1."""
    pooled = torch.tensor([[0.10, 0.20, 0.30, 0.40], [0.0001, 0.0001, 0.0001, 0.0097]])
    # paper: mean (0.05005, 0.10005, 0.15005, 0.20485) / 0.505 -> cumulative 0.0991, 0.297...: n = 1 below 0.1
    paper = kept_count_ref(pooled, 0.1, 0, "paper")
    # normalized: the second head's (0.01, 0.01, 0.01, 0.97) counts as much: mean (0.055, 0.105, 0.155, 0.685)
    normalized = kept_count_ref(pooled, 0.1, 0, "normalized")
    assert int(paper) == 4 - 2 and int(normalized) == 4 - 1
    assert int(kept_count_ref(pooled, 0.01, 0, "paper")) == 4  # n = 0: nothing dropped, not one token


def synced_selection(pooled, seq_len, tau, min_tokens, coverage="paper", keep=None):
    """The kept positions (Hs, K') as the synced path uses them: the padded buffer sliced at the count."""
    kept, count = select_tokens_padded_ref(pooled, seq_len, tau, min_tokens, coverage, keep)
    assert kept.shape == (pooled.shape[0], seq_len) and count.shape == (pooled.shape[0],)
    assert (count == count[0]).all(), "every head keeps the same count"
    return kept[:, : int(count[0])]


def test_select_tokens_forced_keep_is_clamped():
    pooled = smooth_scores_ref(torch.rand(3, 100), 7)
    assert synced_selection(pooled, 110, 0.5, 10, keep=40).shape == (3, 50)
    assert synced_selection(pooled, 110, 0.5, 60, keep=40).shape == (3, 70)  # min_tokens wins
    assert synced_selection(pooled, 110, 0.5, 0, keep=500).shape == (3, 110)  # at most every candidate


def test_ties_at_the_cut_go_to_the_earlier_tokens():
    """Equal scores at the K-th place: the earlier candidates are kept (the padding after the count is Lk - 1)."""
    pooled = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.9]])  # keep 3: 0.9, 0.5 and the first 0.1
    kept, count = select_tokens_padded_ref(pooled, 8, 0.5, 0, keep=3)
    assert count.tolist() == [5] and kept.tolist() == [[0, 1, 5, 6, 7, 7, 7, 7]]


@pytest.mark.parametrize("selecting_heads", ["query", "kv"])
@pytest.mark.parametrize("q_len", [97, 40])
def test_compress_decompress_gather_the_right_rows(selecting_heads, q_len):
    hq, hkv, lk, d = 6, 2, 97, 8
    q, k, v = torch.randn(hq, q_len, d), torch.randn(hkv, lk, d), torch.randn(hkv, lk, d)
    hs = hq if selecting_heads == "query" else hkv
    tail = q_len if q_len < lk else 10
    kept = torch.stack([torch.cat([torch.randperm(lk - tail)[:30].sort().values, torch.arange(lk - tail, lk)])
                        for _ in range(hs)])
    rows = query_rows(kept, hq, q_len, lk)
    assert rows.shape == (hq, kept.shape[1] if q_len == lk else q_len)
    q_c, k_c, v_c = compress_ref(q, k, v, kept, rows)
    for h in range(hq):
        s = h if hs == hq else h // (hq // hkv)  # the selecting head of query head h
        assert torch.equal(k_c[s], k[h // (hq // hkv), kept[s]]) and torch.equal(v_c[s], v[h // (hq // hkv), kept[s]])
        assert torch.equal(q_c[h], q[h, rows[h]])
    out = decompress_ref(q_c, rows, q_len)  # (Lq, Hq, D)
    member = torch.zeros(hq, q_len, dtype=torch.bool).scatter_(1, rows, True)
    assert torch.equal(out.transpose(0, 1)[member], q[member])
    assert (out.transpose(0, 1)[~member] == 0).all()
