"""Kept-keys attention (``rows="all"``): every query row attends causally to its head's kept keys, and to its
``local_keys`` latest keys whether kept or not. The Triton kernel (both loaders) and the PyTorch twin against a
float64 brute force written from the definition, on fresh random inputs and random kept sets; and the runtime's
``rows="all"`` path end to end.

Bounds: relative error vs float64, ||out - ref|| / ||ref||, at most ``numerics.ATTENTION_RELATIVE[dtype]`` (fp32
128 eps, fp16 5 eps, bf16 3 eps: softmax-weighted sums, see tests/numerics.py). NaN fails. On CPU the Triton kernel
runs under TRITON_INTERPRET=1 with small shapes and small tiles (so that one query block spans several key tiles,
masked and unmasked); on a GPU at real shapes with the default tiles.
"""

from __future__ import annotations

import pytest
import torch
from numerics import ATTENTION_RELATIVE

from tsa_patch.kernels import triton_kept_keys
from tsa_patch.kernels.reference import (gather_kept, kept_keys_attention_ref, kept_keys_cost, padded_positions,
                                        select_tokens_padded_ref)
from tsa_patch.kernels.triton_block import Tiling
from tsa_patch.kernels.triton_kept_keys import BLOCK_M, kept_keys_attention, prepare_kept_keys
from tsa_patch.kernels.tsa import tsa_attention, tsa_attention_kept_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":  # (Hq, Hkv, L, D)
    SHAPES = [(32, 8, 4096, 128), (14, 2, 8000, 64), (9, 3, 3000, 64)]
    DTYPES = [torch.bfloat16, torch.float16, torch.float32]
    TILES = dict(block_m=BLOCK_M)
else:  # bf16 is left out on CPU: the Triton 3.6 interpreter computes tl.dot of bf16 wrongly
    SHAPES = [(4, 2, 150, 32), (3, 3, 97, 64), (2, 1, 130, 16)]
    DTYPES = [torch.float16, torch.float32]
    TILES = dict(block_m=32, tiling=Tiling(16, 4, 1))


def shape_id(shape):
    return "Hq{}-Hkv{}-L{}-D{}".format(*shape)


def brute_kept_keys(query, key, value, kept, count, local_keys=0):
    """float64: row m of head h attends to the keys at positions p <= m that its selecting head kept or that lie
    within its ``local_keys`` latest (m - p < local_keys); 0 if none."""
    num_heads, seq_len, head_dim = query.shape
    group, sel_group = num_heads // key.shape[0], num_heads // kept.shape[0]
    out = torch.zeros(seq_len, num_heads, head_dim, dtype=torch.float64, device=query.device)
    rows = torch.arange(seq_len, device=query.device)
    causal = rows[None, :] <= rows[:, None]
    local = rows[:, None] - rows[None, :] < local_keys
    for h in range(num_heads):
        s = h // sel_group
        chosen = torch.zeros(seq_len, dtype=torch.bool, device=query.device)
        chosen[kept[s, : int(count[s])]] = True
        visible = causal & (chosen[None, :] | local)  # (L, L)
        logits = query[h].double() @ key[h // group].double().T * head_dim**-0.5
        weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, h] = weights @ value[h // group].double()
    return out


def random_kept(selecting, seq_len, generator, fraction=0.4):
    """A padded kept buffer (Hs, L) and counts: each head keeps a random subset of its own size, ascending, with
    position 0 left out for some heads (their first rows then see nothing) and padding past the count."""
    kept = torch.full((selecting, seq_len), seq_len - 1, dtype=torch.int64)
    count = torch.zeros(selecting, dtype=torch.int64)
    for s in range(selecting):
        size = max(1, int(seq_len * fraction * (0.5 + torch.rand(1, generator=generator).item())))
        chosen = torch.randperm(seq_len - 1, generator=generator)[:size].sort().values + 1  # never position 0
        if s % 2:
            chosen = torch.cat([torch.zeros(1, dtype=torch.int64), chosen[:-1]])
        kept[s, :size], count[s] = chosen, size
    return kept.to(DEVICE), count.to(DEVICE)


def inputs(shape, dtype, seed):
    hq, hkv, seq_len, d = shape
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(h, seq_len, d, generator=generator) for h in (hq, hkv, hkv))
    return [x.to(DEVICE, dtype) for x in (q, k, v)], generator


def relative_error(out, ref):
    assert torch.isfinite(out).all(), "output holds NaN or inf"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["query_head", "kv_group"])
def test_kernel_and_twin_match_brute_force(shape, dtype, per_kv_head):
    (q, k, v), generator = inputs(shape, dtype, seed=hash((shape, str(dtype), per_kv_head)) % 2**31)
    kept, count = random_kept(shape[1] if per_kv_head else shape[0], shape[2], generator)
    ref = brute_kept_keys(q, k, v, kept, count)
    out, _ = kept_keys_attention(q, k, v, kept, count, shape[3] ** -0.5, **TILES)
    assert out.shape == (shape[2], shape[0], shape[3]) and out.dtype == dtype
    assert relative_error(out, ref) < ATTENTION_RELATIVE[dtype]
    twin = kept_keys_attention_ref(q, k, v, kept, count, shape[3] ** -0.5, rows_per_step=64)
    assert relative_error(twin, ref) < ATTENTION_RELATIVE[dtype]
    empty = ref.abs().sum(-1) == 0  # rows that see no kept key (position 0 dropped) are exactly 0
    assert empty.any() and (out[empty] == 0).all()


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] & (s[3] - 1) == 0], ids=shape_id)
def test_both_loaders_compute_the_same_attention(shape):
    """K and V through tensor descriptors (Hopper-class GPUs) and by pointer, each forced: the same bound."""
    dtype = torch.float16
    (q, k, v), generator = inputs(shape, dtype, seed=5)
    kept, count = random_kept(shape[0], shape[2], generator, fraction=0.6)
    ref = brute_kept_keys(q, k, v, kept, count)
    for descriptors in (False, True):
        out, _ = kept_keys_attention(q, k, v, kept, count, shape[3] ** -0.5, descriptors=descriptors, **TILES)
        assert relative_error(out, ref) < ATTENTION_RELATIVE[dtype], descriptors


@pytest.mark.parametrize("local_keys", [1, 40, 300], ids=lambda n: f"local{n}")
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("per_kv_head", [False, True], ids=["query_head", "kv_group"])
def test_local_keys_match_brute_force(shape, local_keys, per_kv_head):
    """Every row also sees its ``local_keys`` latest keys, kept or not (fewer than a query block, more than one,
    and more than the whole CPU sequence): the kernel and the twin against the brute force; no row is empty."""
    dtype = DTYPES[0]
    (q, k, v), generator = inputs(shape, dtype, seed=hash((shape, local_keys, per_kv_head)) % 2**31)
    kept, count = random_kept(shape[1] if per_kv_head else shape[0], shape[2], generator, fraction=0.2)
    ref = brute_kept_keys(q, k, v, kept, count, local_keys)
    out, _ = kept_keys_attention(q, k, v, kept, count, shape[3] ** -0.5, local_keys=local_keys, **TILES)
    assert relative_error(out, ref) < ATTENTION_RELATIVE[dtype]
    twin = kept_keys_attention_ref(q, k, v, kept, count, shape[3] ** -0.5, local_keys=local_keys, rows_per_step=64)
    assert relative_error(twin, ref) < ATTENTION_RELATIVE[dtype]
    assert (ref.abs().sum(-1) > 0).all() and (out.abs().sum(-1) > 0).all()  # each row sees at least itself


def test_every_kept_key_kept_is_dense_causal_attention():
    hq, hkv, seq_len, d = 4, 2, 100, 32
    q, k, v = (torch.randn(h, seq_len, d, device=DEVICE) for h in (hq, hkv, hkv))
    kept = torch.arange(seq_len, device=DEVICE).expand(hq, -1).contiguous()
    count = torch.full((hq,), seq_len, device=DEVICE)
    out, cost = kept_keys_attention(q, k, v, kept, count, d**-0.5, **TILES)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 0),
                                                             v.double().repeat_interleave(2, 0), is_causal=True)
    assert relative_error(out, dense.transpose(0, 1)) < ATTENTION_RELATIVE[torch.float32]
    assert abs(kept_keys_cost(kept, count, seq_len).item() - 1.0) < 1e-6  # fp32 rounding of a share near 1
    assert abs(float(cost.sum()) - 1.0) < 1e-6  # the kernel's: fp64 sums of fp32-rounded factors


@pytest.mark.parametrize("per_kv_head", [False, True], ids=["query_head", "kv_group"])
def test_prepare_gathers_the_kept_rows_up_to_the_count(per_kv_head):
    """First rows as ``padded_positions + local_keys``; compact K/V rows equal to ``gather_kept``'s within the count
    and zeros from the count to the next tile: moved bits, compared exactly."""
    (q, k, v), generator = inputs(SHAPES[0], DTYPES[0], seed=11)
    kept, count = random_kept(SHAPES[0][1] if per_kv_head else SHAPES[0][0], SHAPES[0][2], generator)
    tile, seq_len = 16, SHAPES[0][2]
    first_rows, key_c, value_c, _, _ = prepare_kept_keys(k, v, kept, count, seq_len, 5, tile)
    assert torch.equal(first_rows, (padded_positions(kept, count, seq_len) + 5).to(torch.int32))
    for compact, full in zip((key_c, value_c), gather_kept(k, v, kept)):
        for s in range(kept.shape[0]):
            n = int(count[s])
            assert torch.equal(compact[s, :n], full[s, :n])
            assert (compact[s, n : -(-n // tile) * tile] == 0).all()


@pytest.mark.parametrize("descriptors", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("local_keys", [0, 40], ids=lambda n: f"local{n}")
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[3] & (s[3] - 1) == 0], ids=shape_id)
def test_compact_rows_past_the_count_are_never_read(shape, local_keys, descriptors, monkeypatch):
    """The compact buffers come uninitialised and are written only up to each count's last tile: filled with NaN
    beforehand, the output still matches the brute force with both loaders (a NaN read would poison its rows; tensor
    descriptors load whole tiles, so the zeros after the count are what keeps them clean)."""
    def poisoned(selecting, slots, head_dim, like):
        return tuple(torch.full((selecting, slots, head_dim), float("nan"), device=like.device, dtype=like.dtype)
                     for _ in range(2))

    monkeypatch.setattr(triton_kept_keys, "_compact_buffers", poisoned)
    dtype = DTYPES[0]
    (q, k, v), generator = inputs(shape, dtype, seed=sum(shape) + local_keys)
    kept, count = random_kept(shape[0], shape[2], generator, fraction=0.3)
    out, _ = kept_keys_attention(q, k, v, kept, count, shape[3] ** -0.5, local_keys=local_keys, descriptors=descriptors,
                              **TILES)
    assert relative_error(out, brute_kept_keys(q, k, v, kept, count, local_keys)) < ATTENTION_RELATIVE[dtype]


def bounds_by_search(first_rows, seq_len, block_m):
    """Per query block, the kept keys at or before its first row and its last row, by ``torch.searchsorted``."""
    starts = torch.arange(0, seq_len, block_m, device=first_rows.device)
    edges = torch.stack([starts, (starts + block_m - 1).clamp_max(seq_len - 1)], dim=1).reshape(1, -1)
    edges = edges.expand(first_rows.shape[0], -1).to(first_rows.dtype).contiguous()
    return torch.searchsorted(first_rows.contiguous(), edges, right=True)


def test_prepare_counts_the_keys_each_query_block_sees():
    kept = torch.tensor([[0, 3, 4, 9, 10, 11, 19, 19]], device=DEVICE)  # two padding entries
    count = torch.tensor([6], device=DEVICE)
    k = v = torch.randn(1, 20, 16, device=DEVICE)
    *_, bounds, _ = prepare_kept_keys(k, v, kept, count, 20, 0, 16, block_m=4)
    # blocks [0,3], [4,7], [8,11], [12,15], [16,19]: (keys <= first row, keys <= last row)
    assert bounds.tolist()[0] == [1, 2, 3, 3, 3, 6, 6, 6, 6, 6]


@pytest.mark.parametrize("local_keys", [0, 7, 40])
@pytest.mark.parametrize("block_m", [16, 32])
def test_prepare_bounds_and_cost_match_search_and_reference(block_m, local_keys):
    """On random kept sets (some heads keeping nothing, some everything): the bounds equal ``torch.searchsorted``'s
    on the first rows, exactly, and the cost parts sum to ``kept_keys_cost``."""
    generator = torch.Generator().manual_seed(block_m + local_keys)
    seq_len, heads = 150, 5
    kept, count = random_kept(heads, seq_len, generator, fraction=0.3)
    count[1], count[2] = 0, seq_len
    kept[2] = torch.arange(seq_len, device=DEVICE)
    k = v = torch.randn(heads, seq_len, 16, device=DEVICE)
    first_rows, _, _, bounds, cost = prepare_kept_keys(k, v, kept, count, seq_len, local_keys, 16, block_m)
    assert bounds.dtype == torch.int32 and torch.equal(bounds.long(), bounds_by_search(first_rows, seq_len, block_m))
    expected = kept_keys_cost(kept, count, seq_len, local_keys).item()
    assert abs(float(cost.sum()) - expected) < 1e-6  # both a mean of shares in [0, 1]: fp32 rounding


def test_cost_counts_the_query_rows_each_kept_key_reaches():
    kept = torch.tensor([[0, 5, 9, 9], [2, 9, 9, 9]])
    count = torch.tensor([3, 2])
    pairs = [(10 - 0) + (10 - 5) + (10 - 9), (10 - 2) + (10 - 9)]
    expected = sum(p / 55 for p in pairs) / 2
    assert abs(kept_keys_cost(kept, count, 10).item() - expected) < 1e-6


@pytest.mark.parametrize("local_keys", [0, 1, 3, 10, 25])
def test_cost_counts_each_visible_pair_once(local_keys):
    """With local keys, the cost is the visible (row, key) pairs of the brute force's mask, over L (L + 1) / 2."""
    generator = torch.Generator().manual_seed(local_keys)
    seq_len = 20
    kept, count = random_kept(3, seq_len, generator, fraction=0.3)
    rows = torch.arange(seq_len)
    pairs = 0
    for s in range(3):
        chosen = torch.zeros(seq_len, dtype=torch.bool)
        chosen[kept[s, : int(count[s])].cpu()] = True
        pairs += ((rows[None, :] <= rows[:, None]) & (chosen[None, :] | (rows[:, None] - rows[None, :] < local_keys)))\
            .sum().item()
    expected = pairs / (3 * seq_len * (seq_len + 1) / 2)
    assert abs(kept_keys_cost(kept.cpu(), count.cpu(), seq_len, local_keys).item() - expected) < 1e-6


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kept_keys_path_keeps_the_papers_tokens_and_every_row(backend, selection):
    """``tsa_attention_kept_keys`` selects exactly the tokens the paper's path keeps, and computes every query row
    over them (where the paper's path leaves the dropped rows 0)."""
    torch.manual_seed(3)
    hq, hkv, seq_len, d = 6, 2, 131, 32
    q, k, v = (torch.randn(h, seq_len, d, device=DEVICE) for h in (hq, hkv, hkv))
    options = dict(tau=0.1, window=16, pool_kernel=7, min_tokens=16, selection=selection, scaling=d**-0.5)
    paper, kept = tsa_attention(q, k, v, backend="torch", **options)
    out, buffer, count, _ = tsa_attention_kept_keys(q, k, v, backend=backend, **options)
    assert kept.shape[1] < seq_len, "tau = 0.1 must drop tokens here"
    assert count.tolist() == [kept.shape[1]] * kept.shape[0] and torch.equal(buffer[:, : kept.shape[1]], kept)
    ref = brute_kept_keys(q, k, v, buffer, count)
    assert relative_error(out, ref) < ATTENTION_RELATIVE[torch.float32]
    head_rows = kept.repeat_interleave(hq // kept.shape[0], 0)  # (Hq, K') the rows the paper computes
    for h in range(hq):
        dropped = torch.arange(seq_len, device=DEVICE) > head_rows[h, 0]  # rows that see some kept key ...
        dropped[head_rows[h]] = False  # ... and that the paper's path does not compute
        assert (paper[dropped, h] == 0).all() and (out[dropped, h] != 0).any(-1).all()
        # a kept row sees the same keys either way: the two paths agree on it
        assert relative_error(out[head_rows[h], h], paper[head_rows[h], h].double()) < ATTENTION_RELATIVE[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kept_keys_path_adds_the_local_keys(backend):
    """``tsa_attention_kept_keys(local_keys=...)``: the same kept tokens, and every row also over its local keys."""
    torch.manual_seed(4)
    hq, hkv, seq_len, d = 6, 2, 131, 32
    q, k, v = (torch.randn(h, seq_len, d, device=DEVICE) for h in (hq, hkv, hkv))
    options = dict(tau=0.1, window=16, pool_kernel=7, min_tokens=16, selection="query_head", scaling=d**-0.5)
    _, plain_kept, plain_count, _ = tsa_attention_kept_keys(q, k, v, backend=backend, **options)
    out, kept, count, _ = tsa_attention_kept_keys(q, k, v, backend=backend, local_keys=8, **options)
    assert torch.equal(count, plain_count) and torch.equal(kept, plain_kept) and int(count.min()) < seq_len
    assert relative_error(out, brute_kept_keys(q, k, v, kept, count, 8)) < ATTENTION_RELATIVE[torch.float32]


def test_selection_pads_with_a_position_no_query_sees():
    pooled = torch.rand(3, 90)
    kept, count = select_tokens_padded_ref(pooled, 100, tau=0.2, min_tokens=10)
    positions = padded_positions(kept, count, 100)
    assert (positions[:, int(count[0]):] == 100).all() and (positions.diff(dim=-1) >= 0).all()
