"""Kept-keys attention in Triton: every query row attends causally to its head's kept keys (``rows="all"``).

The paper's compression computes only the kept tokens' query rows and leaves the others 0. With ``rows="all"`` a
sparse layer drops keys only: every one of the ``L`` query rows attends to the kept keys at or before its own
position. One launch (``prepare_kept_keys``) gathers the kept keys and values into compact ``(Hs, M, D)`` tensors,
only as far as each head's count reaches (the buffer is sized for keeping everything), and writes the first row
that sees each kept key. The positions ascend, so the keys a query block sees are a prefix of the compact
sequence: every key at or before the block's first row is visible to all of its rows (those tiles run without a
mask) and only the keys inside the block's own span need the causal mask, a tile or two. The same launch writes
both bounds of every query block, and the share of query-key pairs computed (the statistics), on the device:
nothing is read back to the host, and a CUDA graph can capture the call.

With ``local_keys`` (a policy's ``local_keys``), row ``m`` also sees the ``local_keys`` keys ending at its own
position, kept or not, read from the layer's full K and V: the kept keys inside that band are skipped (each kept
key counts from row ``p + local_keys`` on), so no key is counted twice. A query block needs its band's tiles only,
``(local_keys + BLOCK_M) / BLOCK_N`` of them.

The online softmax is ``triton_block.online_step`` (FlashAttention-2's order). On a Hopper-class GPU, for 16-bit
inputs with a power-of-two head dim, K and V tiles are loaded through tensor descriptors, as the block-sparse
kernel does. ``reference.kept_keys_attention_ref`` is the PyTorch twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_block import Tiling, default_tiling, key_value_tiles, uses_descriptors
from .triton_import import HAS_TRITON, tl, triton

_LOG2_E = 1.4426950408889634
# Query rows per program (the default).
BLOCK_M = 128
# The launch shape for 16-bit inputs: 64 keys per step, 4 warps, 2 stages, within 6 % of the fastest shape of
# benchmarks/kept_keys_gpu.py's sweep on an H100 everywhere (x1.12-1.47 the block-sparse kernel's shape).
HALF_TILING = Tiling(64, 4, 2)

if HAS_TRITON:
    from .triton_block import allowed_step, key_tile, online_step

    @triton.jit
    def _kept_keys_kernel(Q, K, V, Pos, Out, Bounds, KeyFull, ValueFull, scale_log2, stride_qh, stride_ql,
                          stride_kh, stride_kl, stride_ph, stride_ol, stride_oh, stride_bh, stride_fkh, stride_fkl,
                          stride_fvh, stride_fvl, seq_len, sel_group, kv_group, local_keys, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                          DESCRIPTORS: tl.constexpr, PRECISION: tl.constexpr):
        # K and V: the compact (Hs, M, D) tensors by pointer (K's strides, which V shares), or (head, key, dim)
        # tensor descriptors with DESCRIPTORS. Pos: the first row that sees each kept key (its position plus
        # local_keys). KeyFull, ValueFull: the layer's (Hkv, L, D) keys and values, for the local keys.
        query_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first: better load balance
        head = tl.program_id(1)
        selecting = head // sel_group
        offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=(offs_m[:, None] < seq_len) & d_valid[None, :], other=0.0)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # kept keys [0, seen_by_all) are seen by the block's first row (so by all); [.., visible) by its last
        seen_by_all = tl.load(Bounds + selecting * stride_bh + 2 * query_block)
        visible = tl.load(Bounds + selecting * stride_bh + 2 * query_block + 1)
        unmasked_end = seen_by_all - seen_by_all % BLOCK_N
        for n_start in range(0, unmasked_end, BLOCK_N):  # every row sees these keys: no mask
            keys = n_start + offs_n
            k, v = key_tile(K, V, selecting, n_start, keys, keys < unmasked_end, offs_d, d_valid, stride_kh,
                            stride_kl, stride_kh, stride_kl, BLOCK_N, HEAD_DIM, DESCRIPTORS)
            row_max, row_sum, acc = online_step(q, row_max, row_sum, acc, k, v, keys, offs_m, seq_len, scale_log2,
                                                False, PRECISION, True)
        for n_start in range(unmasked_end, visible, BLOCK_N):  # the last tile or two: masked by first row
            keys = n_start + offs_n
            k, v = key_tile(K, V, selecting, n_start, keys, keys < visible, offs_d, d_valid, stride_kh, stride_kl,
                            stride_kh, stride_kl, BLOCK_N, HEAD_DIM, DESCRIPTORS)
            first_rows = tl.load(Pos + selecting * stride_ph + keys, mask=keys < visible, other=seq_len)
            row_max, row_sum, acc = online_step(q, row_max, row_sum, acc, k, v, first_rows, offs_m, seq_len,
                                                scale_log2, True, PRECISION, True)
        # the local keys: row m sees positions (m - local_keys, m], kept or not
        kv_head = head // kv_group
        first_local = tl.maximum(query_block * BLOCK_M - local_keys + 1, 0)
        local_end = tl.where(local_keys > 0, tl.minimum(query_block * BLOCK_M + BLOCK_M, seq_len), first_local)
        for n_start in range(first_local, local_end, BLOCK_N):
            keys = n_start + offs_n
            in_range = keys < local_end
            k, v = key_tile(KeyFull, ValueFull, kv_head, n_start, keys, in_range, offs_d, d_valid, stride_fkh,
                            stride_fkl, stride_fvh, stride_fvl, BLOCK_N, HEAD_DIM, False)
            allowed = ((keys[None, :] <= offs_m[:, None]) & (keys[None, :] + local_keys > offs_m[:, None])
                       & in_range[None, :])
            row_max, row_sum, acc = allowed_step(q, row_max, row_sum, acc, k, v, allowed, scale_log2, PRECISION)
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # a row that sees no key stays 0
        tl.store(Out + offs_m[:, None] * stride_ol + head * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < seq_len) & d_valid[None, :])

    @triton.jit
    def _first_edge(first_row, seq_len, block_m, edges):
        # The index of the first edge at or after ``first_row`` among the ascending edges 0, block_m - 1, block_m,
        # 2 block_m - 1, ... (each query block's first and last row, the last clamped to seq_len - 1): ``edges``
        # (none) from seq_len on
        block = first_row // block_m
        return tl.where(first_row < seq_len, 2 * block + (first_row % block_m > 0).to(block.dtype), edges)

    @triton.jit
    def _prepare_kernel(Kept, Count, Key, Value, FirstRows, KeyC, ValueC, Bounds, Cost, stride_kept, stride_first,
                        stride_kh, stride_kl, stride_vh, stride_vl, stride_ch, stride_cl, stride_bh, stride_cost, slots,
                        seq_len, local_keys, sel_per_kv, block_m, edges, inv_pairs, local_share, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
        # One (selecting head, block of BLOCK_S slots): the first row that sees each kept key (padding: none), the
        # kept rows of K and V (zeros past the count up to its next multiple of TILE), the program's part of the
        # share of query-key pairs computed, and the bounds: exactly s kept keys lie at or before the edges (each
        # query block's first and last row, ascending) from the first row of key s - 1 up to that of key s
        head, chunk = tl.program_id(0), tl.program_id(1)
        offs = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
        count = tl.load(Count + head)
        in_buffer = offs < slots
        within = in_buffer & (offs < count)
        position = tl.load(Kept + head * stride_kept + offs, mask=within, other=seq_len)
        tl.store(FirstRows + head * stride_first + offs, (position + local_keys).to(tl.int32), mask=in_buffer)
        pairs = tl.sum(tl.where(within, tl.maximum(seq_len - local_keys - position, 0), 0).to(tl.int64), 0)
        local = tl.where(chunk == 0, local_share, 0.0)  # every row's local keys, counted once per head
        tl.store(Cost + head * stride_cost + chunk, pairs.to(tl.float64) * inv_pairs + local)
        previous = tl.load(Kept + head * stride_kept + offs - 1, mask=(offs > 0) & (offs <= count), other=seq_len)
        lowest = tl.where(offs > 0, _first_edge(previous + local_keys, seq_len, block_m, edges), 0)
        span = tl.where(offs <= count, _first_edge(position + local_keys, seq_len, block_m, edges) - lowest, 0)
        for j in range(0, tl.max(span, 0)):
            tl.store(Bounds + head * stride_bh + lowest + j, offs.to(tl.int32), mask=j < span)
        written = (in_buffer & (offs < (count + TILE - 1) // TILE * TILE))[:, None]
        offs_d = tl.arange(0, BLOCK_D)
        kv_head = head // sel_per_kv
        rows = tl.where(within, position, 0)[:, None]
        target = head * stride_ch + offs[:, None] * stride_cl + offs_d[None, :]
        loaded = within[:, None] & (offs_d < HEAD_DIM)[None, :]
        stored = written & (offs_d < HEAD_DIM)[None, :]
        key = tl.load(Key + kv_head * stride_kh + rows * stride_kl + offs_d[None, :], mask=loaded, other=0.0)
        tl.store(KeyC + target, key, mask=stored)
        value = tl.load(Value + kv_head * stride_vh + rows * stride_vl + offs_d[None, :], mask=loaded, other=0.0)
        tl.store(ValueC + target, value, mask=stored)


def prepare_kept_keys(key: Tensor, value: Tensor, kept: Tensor, count: Tensor, seq_len: int, local_keys: int,
                      tile: int, block_m: int = BLOCK_M) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel's inputs in one launch, on the device: key, value (Hkv, L, D); kept (Hs, M) positions, ascending in
    the first ``count[s]`` entries; ``tile``: the kernel's keys per step; ``block_m``: its query rows per program.

    Returns first_rows (Hs, M) int32, ``kept + local_keys`` within the count and ``seq_len + local_keys`` past it;
    key_c, value_c (Hs, M, D) contiguous: the kept rows (``reference.gather_kept``) within the count, zeros up to
    its next multiple of ``tile`` (the kernel's last tile reads them), the rest left unwritten; bounds (Hs, 2 Nb)
    int32: per query block of ``block_m`` rows, how many kept keys its first row sees (so all its rows) and how
    many its last row sees (``torch.searchsorted(first_rows, edges, right=True)``); and cost, float64 parts whose
    sum is ``reference.kept_keys_cost`` (the share of dense causal attention's query-key pairs computed).
    """
    selecting, slots = kept.shape
    kv_heads, _, head_dim = key.shape
    kept = kept if kept.stride(-1) == 1 else kept.contiguous()
    first_rows = torch.empty(selecting, slots, device=key.device, dtype=torch.int32)
    key_c, value_c = _compact_buffers(selecting, slots, head_dim, key)
    block_s = 64
    chunks = triton.cdiv(slots + 1, block_s)  # slot ``slots`` too: the edges past a full buffer's last key
    edges = 2 * triton.cdiv(seq_len, block_m)
    bounds = torch.empty(selecting, edges, device=key.device, dtype=torch.int32)
    cost = torch.empty(selecting, chunks, device=key.device, dtype=torch.float64)
    band = min(local_keys, seq_len)  # every row's local keys: band (band + 1) / 2 + (L - band) band pairs per head
    dense_pairs = seq_len * (seq_len + 1) / 2
    _prepare_kernel[(selecting, chunks)](
        kept, count, key, value, first_rows, key_c, value_c, bounds, cost, kept.stride(0), first_rows.stride(0),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), key_c.stride(0), key_c.stride(1),
        bounds.stride(0), cost.stride(0), slots, seq_len, local_keys, selecting // kv_heads, block_m, edges,
        1.0 / (selecting * dense_pairs), (band * (band + 1) / 2 + (seq_len - band) * band) / (selecting * dense_pairs),
        BLOCK_S=block_s, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM=head_dim, TILE=tile, num_warps=4)
    return first_rows, key_c, value_c, bounds, cost


def _compact_buffers(selecting: int, slots: int, head_dim: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialised (Hs, M, D) buffers for the compact keys and values (the tests poison them)."""
    return tuple(torch.empty(selecting, slots, head_dim, device=like.device, dtype=like.dtype) for _ in range(2))


def kept_keys_attention(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, count: Tensor, scaling: float,
                        local_keys: int = 0, block_m: int = BLOCK_M, tiling: Tiling | None = None,
                        descriptors: bool | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of ``reference.kept_keys_attention_ref`` (same arguments and result up to rounding), with no
    host synchronisation: ``count`` stays on the device.

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D); head dim unit-stride; fp16, bf16 or fp32. Full prefills only.
        kept: (Hs, M) int positions, ascending in the first ``count[s]`` entries of each row, ``Hs`` in {Hq, Hkv}.
        count: (Hs,) int kept positions per selecting head.
        scaling: softmax scale.
        local_keys: how many of the latest keys every row sees whatever the selection (0: the kept keys only).
        block_m: query rows per program (a power of two, at least 16).
        tiling: keys per inner step (at most ``block_m``), warps and stages; None: ``HALF_TILING`` for fp16 and bf16,
            ``triton_block.default_tiling`` for fp32.
        descriptors: load K and V through tensor descriptors; None decides by ``triton_block.uses_descriptors``,
            True forces it (power-of-two head dims only; the tests run it under the interpreter).

    Returns:
        out: (L, Hq, D) in the dtype of ``query``: row ``m`` of head ``h`` is causal attention over the keys at
        positions ``m - local_keys < p <= m`` and the kept keys of ``h`` at positions ``p <= m - local_keys`` (0
        where there is none). fp32 inputs are multiplied in full fp32 (no TF32).
        cost: a float64 device tensor whose sum is the share of dense causal attention's query-key pairs computed
        (``reference.kept_keys_cost``), for the statistics.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1:
            raise ValueError(f"kept_keys_attention: the head dim of {name} must be contiguous")
    num_heads, seq_len, head_dim = query.shape
    selecting = kept.shape[0]
    if tiling is None:  # fp32 tiles need the block-sparse kernel's smaller shared-memory shapes
        tiling = default_tiling(block_m, head_dim, query.dtype) if query.dtype == torch.float32 else HALF_TILING
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    common = dict(BLOCK_M=block_m, BLOCK_N=min(tiling.block_n, block_m), PRECISION=precision,
                  num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    # the first row that sees each kept key, ascending (padding: seen by none), and the compact K and V
    first_rows, key_c, value_c, bounds, cost = prepare_kept_keys(key, value, kept, count, seq_len, local_keys,
                                                                 common["BLOCK_N"], block_m)
    out = torch.empty(seq_len, num_heads, head_dim, device=query.device, dtype=query.dtype)
    grid = (triton.cdiv(seq_len, block_m), num_heads)
    strides = key_c.stride()  # value_c's too: both contiguous, of one shape
    use_descriptors = uses_descriptors(query, key_c, value_c) if descriptors is None else descriptors
    key_tiles, value_tiles, block_d = key_value_tiles(key_c, value_c, common["BLOCK_N"], use_descriptors)
    _kept_keys_kernel[grid](
        query, key_tiles, value_tiles, first_rows, out, bounds, key, value, scaling * _LOG2_E, query.stride(0),
        query.stride(1), strides[0], strides[1], first_rows.stride(0), out.stride(0), out.stride(1), bounds.stride(0),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), seq_len, num_heads // selecting,
        num_heads // key.shape[0], local_keys, HEAD_DIM=head_dim, DESCRIPTORS=use_descriptors, BLOCK_D=block_d,
        **common)
    return out, cost
