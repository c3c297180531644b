"""Triton kernels against their PyTorch twins on fresh random inputs (CPU: TRITON_INTERPRET=1, small shapes).

score_keys: relative error vs float64 at most 2x that of score_keys_ref in the same dtype, plus 8 fp32 eps
of slack (where both errors are near zero: fp32 inputs are scored in exact IEEE fp32). compress/decompress move bits: they must be exactly equal. NaN fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from tsa_patch.kernels import triton_score, triton_select
from tsa_patch.kernels.reference import (compress_ref, coverage_distribution, decompress_ref, gathered_attention_ref,
                                        query_rows, score_keys_ref, select_tokens_padded_ref, smooth_scores_ref)
from tsa_patch.kernels.triton_gather import gathered_attention
from tsa_patch.kernels.triton_rows import compress, decompress
from tsa_patch.kernels.triton_score import score_keys
from tsa_patch.kernels.triton_select import (select_tokens_padded, select_tokens_padded_radix,
                                             select_tokens_padded_sorted)
from tsa_patch.kernels.triton_smooth import smooth_scores
from numerics import ATTENTION_RELATIVE, eps

SLACK = 8 * eps(torch.float32)


# the two implementations that select_tokens_padded chooses between by the candidate count
SELECTIONS = {"sorted": select_tokens_padded_sorted, "radix": select_tokens_padded_radix}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Interpreted Triton is slow: small shapes on CPU, real ones on the GPU. bf16 only on the GPU (the 3.6
# interpreter computes tl.dot of bf16 wrongly).
if DEVICE == "cuda":
    SHAPES = [(32, 8, 131072, 128, 128), (32, 8, 8191, 128, 128), (9, 3, 4097, 64, 128), (4, 4, 300, 96, 64)]
    DTYPES = [torch.bfloat16, torch.float16, torch.float32]
else:
    SHAPES = [(4, 2, 97, 32, 16), (6, 3, 200, 64, 32), (2, 1, 130, 48, 64)]
    DTYPES = [torch.float16, torch.float32]


def shape_id(shape):
    return "Hq{}-Hkv{}-L{}-D{}-W{}".format(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_score_keys_matches_reference(shape, dtype, brute):
    hq, hkv, lk, d, w = shape
    q = torch.randn(hq, w + 5, d, device=DEVICE).to(dtype)
    k = torch.randn(hkv, lk, d, device=DEVICE).to(dtype)
    out = score_keys(q, k, w, d**-0.5)
    assert out.shape == (hq, lk - w) and out.dtype == torch.float32
    # the reference upcasts to fp32; its error vs float64 is what plain torch achieves on these inputs
    if lk * hq > 10**6:  # the float64 brute force would take minutes: compare with the fp32 reference
        truth = score_keys_ref(q.double(), k.double(), w, d**-0.5)
    else:
        truth = brute.scores(q.cpu(), k.cpu(), w, d**-0.5).to(DEVICE)
    ref_error = brute.relative_error(score_keys_ref(q, k, w, d**-0.5), truth)
    assert brute.relative_error(out, truth) <= 2 * ref_error + SLACK


def assert_scored_like_brute(q, k, window, brute):
    """``score_keys`` within the bound above: twice the reference's error against the float64 brute force."""
    out = score_keys(q, k, window, q.shape[-1] ** -0.5)
    truth = brute.scores(q.cpu(), k.cpu(), window, q.shape[-1] ** -0.5).to(DEVICE)
    ref_error = brute.relative_error(score_keys_ref(q, k, window, q.shape[-1] ** -0.5), truth)
    assert brute.relative_error(out, truth) <= 2 * ref_error + SLACK


@pytest.mark.parametrize("seq_len", [2600, 5000])
def test_score_keys_merges_many_key_splits(seq_len, brute, monkeypatch):
    """Pass 1 split over several key ranges (3 and 5: fewer than the merge's power-of-two block, so masked
    splits take part), as on a GPU with many SMs; the interpreter otherwise runs a single split. Same bound as
    above."""
    monkeypatch.setattr(triton_score, "_multiprocessors", lambda device: 64)
    q = torch.randn(2, 20, 32, device=DEVICE) * 2
    k = torch.randn(1, seq_len, 32, device=DEVICE)
    assert triton_score.key_splits(2, 16, seq_len, q.device)[0] == math.ceil(seq_len / 1024)  # what this tests
    assert_scored_like_brute(q, k, 16, brute)


def test_score_keys_over_tile_runs_and_window_blocks(brute, monkeypatch):
    """Pass 2 with each program on a run of key tiles (3 programs per head, the last run short) and a window of
    three blocks (the last partial), whose shares add up through the stored scores. Same bound as above."""
    monkeypatch.setattr(triton_score, "_multiprocessors", lambda device: 3)
    monkeypatch.setattr(triton_score, "SCORE_WINDOW_BLOCK", 32)
    window, seq_len = 80, 960  # 880 candidates: 14 tiles of 64 (the last partial), runs of 5, 5, 4
    q = torch.randn(2, window, 32, device=DEVICE) * 2
    k = torch.randn(1, seq_len, 32, device=DEVICE)
    assert_scored_like_brute(q, k, window, brute)


@pytest.mark.parametrize("edge", [-2, -1, 0, 1])
def test_score_keys_at_the_causal_edge(edge, brute):
    """Pass 1 skips the causal mask on the key blocks every window query sees whole: the lengths here put the
    first window query's position (the last key all of them see) one or two keys either side of a block's end.
    Same bound as above."""
    window = 16
    seq_len = 2 * triton_score.KEY_BLOCK + window - 1 + edge  # keys 0 .. 2 KEY_BLOCK - 1 + edge seen by all
    q = torch.randn(3, window, 32, device=DEVICE) * 2
    k = torch.randn(1, seq_len, 32, device=DEVICE)
    assert_scored_like_brute(q, k, window, brute)


@pytest.mark.parametrize("pool_kernel", [1, 7])
@pytest.mark.parametrize("candidates", [5, 1000, 4099] + ([131072 - 128] if DEVICE == "cuda" else []))
def test_smooth_scores_matches_reference(candidates, pool_kernel, brute):
    scores = torch.rand(8, candidates, device=DEVICE) ** 8
    out = smooth_scores(scores, pool_kernel)
    truth = smooth_scores_ref(scores.double(), pool_kernel)
    assert out.shape == scores.shape and out.dtype == torch.float32
    assert brute.relative_error(out, truth) <= 2 * brute.relative_error(smooth_scores_ref(scores, pool_kernel), truth) + SLACK


def counts_within_rounding(pooled, tau, coverage):
    """The candidates dropped by the coverage rule at every cumulative tail mass within fp32 rounding of ``tau``.

    Both selections sum the ascending head-averaged scores in fp32, in different orders (the reference a running
    sum of the sorted scores, the kernel the scores below a threshold plus the ties at it); each partial sum of at
    most C terms is off by at most C eps32 of the total (the total is 1 after normalising), so the rule's
    ``below`` (how many partial sums stay under tau) is only determined up to the sums within 2 C eps32 of tau.
    """
    dist = coverage_distribution(pooled.double(), coverage)
    if coverage == "paper":
        dist = dist / (dist.sum() + 1e-8)
    tail = torch.sort(dist).values.cumsum(0)
    slack = 2 * pooled.shape[1] * eps(torch.float32)
    low, high = int((tail < tau - slack).sum()), int((tail < tau + slack).sum())
    belows = range(low, high + 1)
    return {b + 1 if (coverage == "paper" and b > 0) else b for b in belows}


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("coverage", ["paper", "normalized"])
@pytest.mark.parametrize("case", ["peaked", "ties", "forced", "tau0", "floor", "no_mass", "lone_top"])
@pytest.mark.parametrize("heads,candidates", [(1, 7), (5, 1000), (14, 2500)]
                         + ([(32, 8064), (32, 131072 - 128)] if DEVICE == "cuda" else []))
def test_select_tokens_padded_matches_reference(heads, candidates, case, coverage, selection):
    """Both Triton selections (the sorts and the radix search): the count the rule gives (exactly,
    unless a tail mass lies within fp32 rounding of tau: then one of the counts that rounding allows), and, for
    that count, exactly the reference's positions (ties at the cut go to the earlier token), tail and padding."""
    generator = torch.Generator(device=DEVICE).manual_seed(heads * candidates + len(case))
    pooled = torch.rand(heads, candidates, device=DEVICE, generator=generator) ** 6
    if case == "ties":  # few distinct values: many exact ties at the cut
        pooled = (pooled * 8).round() / 8
    if case == "no_mass":  # nothing to cover: the whole tail is dropped down to the floor, ties to the earliest
        pooled = torch.zeros_like(pooled)
    if case == "lone_top":  # tau above 1: every candidate dropped down to the floor, the radix search's tail
        pooled[:, -1] = 3.0  # ending past a largest score above 2
    window = 16
    tau, min_tokens, keep = {"peaked": (0.01, 4, None), "ties": (0.05, 4, None), "forced": (0.01, 4, candidates // 3),
                             "tau0": (0.0, 4, None), "floor": (0.3, candidates // 2, None),
                             "no_mass": (0.01, 4, None), "lone_top": (1.5, 4, None)}[case]
    kept, count = SELECTIONS[selection](pooled, candidates + window, tau, min_tokens, coverage, keep)
    _, ref_count = select_tokens_padded_ref(pooled, candidates + window, tau, min_tokens, coverage, keep)
    assert kept.shape == (heads, candidates + window) and kept.dtype == torch.int64 and count.shape == (heads,)
    assert (count == count[0]).all()
    chosen = int(count[0]) - window
    if keep is None and chosen > min(min_tokens, candidates):  # the rule, not the floor, set the count
        allowed = {candidates - d for d in counts_within_rounding(pooled, tau, coverage)}
        assert chosen in allowed and int(ref_count[0]) - window in allowed
        if len(allowed) == 1:
            assert torch.equal(count, ref_count)
    else:
        assert torch.equal(count, ref_count)
    expected, _ = select_tokens_padded_ref(pooled, candidates + window, tau, min_tokens, coverage, keep=chosen)
    assert torch.equal(kept, expected)


def round_and_tied_rows() -> torch.Tensor:
    """Distinct scores with few mantissa bits (multiples of 2^-12): the head's K-th largest is itself a pattern
    whose low bits are 0, where the radix search stops early with exactly K scores at or above its candidate. A
    second row replaces the 249th-251st largest by v + 1 ulp, v, v (v's last 4 bits 3): at K 249 and 250 the cut
    is tied, the search runs all its passes, and the scores above the cut include one inside v's last digit
    block. A row of zeros has every score at 0, the search's lowest candidate."""
    generator = torch.Generator(device=DEVICE).manual_seed(12)
    candidates = 700
    distinct = (torch.randperm(candidates, device=DEVICE, generator=generator) + 1).float() * 2.0**-12
    by_rank = torch.argsort(distinct, descending=True)
    v_bits = distinct[by_rank[250]].view(torch.int32) + 3
    tied = distinct.clone()
    tied[by_rank[248]] = (v_bits + 1).view(torch.float32)
    tied[by_rank[249]] = tied[by_rank[250]] = v_bits.view(torch.float32)
    return torch.stack([distinct, tied, torch.zeros_like(distinct)])  # zeros: no cut below 0 to stop at


def assert_round_and_tied_cuts_like_reference(select, keeps):
    """``select`` on ``round_and_tied_rows`` at each forced count: the reference's count and positions."""
    pooled, window = round_and_tied_rows(), 8
    candidates = pooled.shape[1]
    for keep in keeps:
        kept, count = select(pooled, candidates + window, 0.0, 1, "paper", keep)
        expected, ref_count = select_tokens_padded_ref(pooled, candidates + window, 0.0, 1, "paper", keep)
        assert torch.equal(count, ref_count) and torch.equal(kept, expected)


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_select_cut_at_a_round_score_and_at_ties_an_ulp_apart(selection):
    """``round_and_tied_rows`` at counts around the tied scores: the reference's positions, ties to the earlier
    token."""
    assert_round_and_tied_cuts_like_reference(SELECTIONS[selection], (1, 248, 249, 250, 251, 700))


@pytest.mark.parametrize("count_bits,mass_bits", [(1, 1), (2, 2), (8, 4)])
def test_radix_search_at_every_digit_width(count_bits, mass_bits, monkeypatch):
    """The radix search with other bits a pass than the defaults (tested above): 1, 2 and 8 for the K-th largest,
    1, 2 and 4 for the coverage rule's tail."""
    monkeypatch.setattr(triton_select, "COUNT_BITS", count_bits)
    monkeypatch.setattr(triton_select, "MASS_BITS", mass_bits)
    assert_radix_search_like_reference(seed=count_bits)


def test_radix_search_over_several_steps_a_pass(monkeypatch):
    """Rows longer than ``BLOCK`` are read in several steps a pass, the mass passes' sums carried across them (here
    256 candidates a step: 3 and 4 steps; the CPU's other rows fit in one): the same results as above."""
    monkeypatch.setattr(triton_select, "BLOCK", 256)
    assert_radix_search_like_reference(seed=0)


def assert_radix_search_like_reference(seed):
    """The radix search at the tied and round cuts, and the count the rule allows (``counts_within_rounding``) with
    the reference's positions for that count, on random and on rounded (tied) scores."""
    assert_round_and_tied_cuts_like_reference(select_tokens_padded_radix, (1, 249, 250, 700))
    window = 8
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    for rounding, tau in ((None, 0.01), (8, 0.05)):
        pooled = torch.rand(5, 1000, device=DEVICE, generator=generator) ** 6
        if rounding:  # few distinct values: exact ties at the tail's end
            pooled = (pooled * rounding).round() / rounding
        kept, count = select_tokens_padded_radix(pooled, 1000 + window, tau, 4, "paper", None)
        chosen = int(count[0]) - window
        assert (count == count[0]).all() and 1000 - chosen in counts_within_rounding(pooled, tau, "paper")
        expected, _ = select_tokens_padded_ref(pooled, 1000 + window, tau, 4, "paper", keep=chosen)
        assert torch.equal(kept, expected)


def test_select_tokens_padded_dispatches_by_candidate_count(monkeypatch):
    """The radix search below RADIX_BELOW candidates, the sorts from there on; both give the reference's result."""
    monkeypatch.setattr(triton_select, "RADIX_BELOW", 64)  # interpreted Triton: keep the rows short
    calls = []
    for name in ("select_tokens_padded_radix", "select_tokens_padded_sorted"):
        original = getattr(triton_select, name)
        monkeypatch.setattr(triton_select, name,
                            lambda *args, _name=name, _fn=original: calls.append(_name) or _fn(*args))
    for candidates in (63, 64):
        pooled = torch.rand(3, candidates, device=DEVICE) ** 6
        kept, count = select_tokens_padded(pooled, candidates + 8, 0.01, 4, "paper", None)
        expected = select_tokens_padded_ref(pooled, candidates + 8, 0.01, 4, "paper", keep=int(count[0]) - 8)[0]
        assert torch.equal(kept, expected)
    assert calls == ["select_tokens_padded_radix", "select_tokens_padded_sorted"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_keys_with_softcap_matches_reference(dtype, brute):
    hq, hkv, lk, d, w = SHAPES[1]
    q = (3 * torch.randn(hq, w + 3, d, device=DEVICE)).to(dtype)  # large logits, where the cap bites
    k = torch.randn(hkv, lk, d, device=DEVICE).to(dtype)
    out = score_keys(q, k, w, d**-0.5, softcap=5.0)
    truth = score_keys_ref(q.double(), k.double(), w, d**-0.5, softcap=5.0)
    plain = score_keys_ref(q, k, w, d**-0.5, softcap=5.0)
    assert brute.relative_error(out, truth) <= 2 * brute.relative_error(plain, truth) + SLACK
    assert brute.relative_error(out, score_keys_ref(q.double(), k.double(), w, d**-0.5)) > 1e-3  # the cap matters: far beyond rounding


def test_score_keys_rejects_bad_shapes():
    q, k = torch.randn(4, 10, 16, device=DEVICE), torch.randn(3, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="bad shapes"):
        score_keys(q, k, 8, 0.25)  # 4 query heads over 3 KV heads
    with pytest.raises(ValueError, match="bad shapes"):
        score_keys(q[:2], k[:2], 16, 0.25)  # fewer queries than the window


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("q_len", ["full", "chunk"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compress_and_decompress_equal_reference(dtype, q_len, selection):
    hq, hkv, lk, d = (32, 8, 8193, 128) if DEVICE == "cuda" else (6, 2, 99, 40)
    lq = lk if q_len == "full" else lk // 3
    q = torch.randn(hq, lq, d, device=DEVICE).to(dtype)
    k, v = torch.randn(hkv, lk, d, device=DEVICE).to(dtype), torch.randn(hkv, lk, d, device=DEVICE).to(dtype)
    hs = hq if selection == "query_head" else hkv
    tail = lq if lq < lk else 16
    keep = (lk - tail) // 2
    kept = torch.stack([torch.cat([torch.randperm(lk - tail, device=DEVICE)[:keep].sort().values,
                                   torch.arange(lk - tail, lk, device=DEVICE)]) for _ in range(hs)])
    rows = query_rows(kept, hq, lq, lk)
    for triton_out, torch_out in zip(compress(q, k, v, kept, rows), compress_ref(q, k, v, kept, rows)):
        assert triton_out.is_contiguous() and torch.equal(triton_out, torch_out)
    q_c = compress_ref(q, k, v, kept, rows)[0]
    out = decompress(q_c, rows, lq)
    assert out.shape == (lq, hq, d) and out.is_contiguous()
    assert torch.equal(out, decompress_ref(q_c, rows, lq))


def _gather_case(shape, dtype, selecting, seed):
    """Random Q/K/V and a sync-free selection of them: kept buffer (Hs, L) and per-head counts on the device."""
    hq, hkv, lk, d, w = shape
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(h, lk, d, device=DEVICE, generator=generator).to(dtype) for h in (hq, hkv, hkv))
    heads = hq if selecting == "query_head" else hkv
    pooled = torch.rand(heads, lk - w, device=DEVICE, generator=generator) ** 4
    kept, count = select_tokens_padded_ref(pooled, lk, 0.2, min(64, lk // 4), "paper")
    return q, k, v, kept, count


@pytest.mark.parametrize("selecting", ["query_head", "kv_group"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gathered_attention_matches_reference(shape, dtype, selecting, brute):
    """Within 2x the error the reference makes in the same dtype (against itself in float64), every dropped row
    exactly 0 and every kept row written (the output is poisoned first)."""
    if shape[2] > 16384:
        pytest.skip("the per-head reference loop is too slow at this length")
    q, k, v, kept, count = _gather_case(shape, dtype, selecting, seed=sum(shape))
    scaling = shape[3] ** -0.5
    out = gathered_attention(q, k, v, kept, count, scaling)
    truth = gathered_attention_ref(q.double(), k.double(), v.double(), kept, count, scaling)
    plain = gathered_attention_ref(q, k, v, kept, count, scaling)
    assert out.shape == (shape[2], shape[0], shape[3]) and out.dtype == dtype
    assert brute.relative_error(out, truth) <= 2 * brute.relative_error(plain, truth) + ATTENTION_RELATIVE[dtype] / 4
    written = torch.zeros(shape[2], shape[0], dtype=torch.bool, device=DEVICE)
    group = shape[0] // kept.shape[0]
    for h in range(shape[0]):
        written[kept[h // group, : int(count[h // group])], h] = True
    assert (out[~written] == 0).all() and written.any()


def test_gathered_attention_softcap_matches_reference(brute):
    q, k, v, kept, count = _gather_case(SHAPES[0], torch.float32, "query_head", seed=3)
    q = 3 * q  # large logits, where the cap bites
    out = gathered_attention(q, k, v, kept, count, 0.2, softcap=5.0)
    truth = gathered_attention_ref(q.double(), k.double(), v.double(), kept, count, 0.2, softcap=5.0)
    assert brute.relative_error(out, truth) <= ATTENTION_RELATIVE[torch.float32]
