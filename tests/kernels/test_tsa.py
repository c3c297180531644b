"""The composite tsa_attention (tsa_patch/kernels/tsa.py) on both backends, against brute-force float64.

torch backend: float32 within ``numerics.ATTENTION_RELATIVE`` (128 eps) relative error; bf16 within 2x the error plain torch makes on the same bf16
inputs. triton backend on CPU runs under TRITON_INTERPRET=1 (fp32, fp16: Triton 3.6's interpreter computes
tl.dot of bf16 wrongly, so bf16 runs on the GPU only) and must match the torch backend's kept set and output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsa_patch.kernels.dense import causal_attention
from tsa_patch.kernels.tsa import tsa_attention
from numerics import ATTENTION_RELATIVE, layout_atol

SHAPES = [(4, 2, 97, 32, 16), (6, 3, 200, 64, 32), (3, 3, 131, 16, 8), (4, 1, 64, 64, 8)]
GPU_SHAPES = [(32, 8, 4099, 128, 128), (9, 3, 3001, 64, 128), (8, 8, 2048, 128, 64)]


def shape_id(shape):
    return "Hq{}-Hkv{}-L{}-D{}-W{}".format(*shape)


def _qkv(hq, hkv, lk, d, lq, dtype=torch.float32, device="cpu"):
    return (torch.randn(hq, lq, d, device=device).to(dtype), torch.randn(hkv, lk, d, device=device).to(dtype),
            torch.randn(hkv, lk, d, device=device).to(dtype))


def _member(kept, hq, lk):
    kept_q = kept.repeat_interleave(hq // kept.shape[0], 0)
    return torch.zeros(hq, lk, dtype=torch.bool, device=kept.device).scatter_(1, kept_q, True)


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("q_len", ["full", "chunk"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_torch_backend_equals_dense_restricted_to_kept(shape, q_len, selection, brute):
    hq, hkv, lk, d, w = shape
    lq = lk if q_len == "full" else lk // 2 + 3
    q, k, v = _qkv(hq, hkv, lk, d, lq)
    out, kept = tsa_attention(q, k, v, tau=0.2, window=w, pool_kernel=7, min_tokens=8, selection=selection,
                              scaling=d**-0.5)
    assert kept.shape[0] == (hq if selection == "query_head" else hkv)
    assert kept.shape[1] < lk, "tau = 0.2 must drop tokens at these sizes"
    assert out.shape == (lq, hq, d)
    ref = brute.restricted_attention(q, k, v, kept, d**-0.5).transpose(0, 1)
    assert brute.relative_error(out, ref) < ATTENTION_RELATIVE[torch.float32]
    member = _member(kept, hq, lk)[:, lk - lq :]  # (Hq, Lq)
    if q_len == "full":
        assert (out.transpose(0, 1)[~member] == 0).all() and (~member).any(), "dropped rows are exactly 0"
    else:
        assert member.all(), "a chunk computes every one of its queries"


def _plain_bf16_restricted(q, k, v, kept, scaling):
    """What plain torch achieves in bf16 on the same kept set: dense SDPA under the restricted mask."""
    hq, lk = q.shape[0], k.shape[1]
    kq, vq = k.repeat_interleave(hq // k.shape[0], 0), v.repeat_interleave(hq // v.shape[0], 0)
    member = _member(kept, hq, lk)
    allowed = member[:, None, :] & torch.ones(lk, lk, dtype=torch.bool).tril()
    allowed |= torch.eye(lk, dtype=torch.bool)  # keep dropped rows finite; they are zeroed below
    out = F.scaled_dot_product_attention(q, kq, vq, attn_mask=allowed, scale=scaling)
    return torch.where(member[:, :, None], out, torch.zeros_like(out))


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
def test_torch_backend_bf16_within_twice_torch_error(selection, brute):
    hq, hkv, lk, d, w = 4, 2, 257, 64, 32
    q, k, v = _qkv(hq, hkv, lk, d, lk, dtype=torch.bfloat16)
    out, kept = tsa_attention(q, k, v, tau=0.1, window=w, pool_kernel=7, min_tokens=16, selection=selection,
                              scaling=d**-0.5)
    assert out.dtype == torch.bfloat16 and kept.shape[1] < lk
    truth = brute.restricted_attention(q, k, v, kept, d**-0.5)  # float64 math on the bf16 inputs
    plain = _plain_bf16_restricted(q, k, v, kept, d**-0.5)
    assert brute.relative_error(out.transpose(0, 1), truth) <= 2 * brute.relative_error(plain, truth)


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
def test_tau_zero_equals_dense(selection):
    hq, hkv, lk, d = 6, 2, 150, 32
    q, k, v = _qkv(hq, hkv, lk, d, lk)
    out, kept = tsa_attention(q, k, v, tau=0.0, window=16, pool_kernel=7, min_tokens=0, selection=selection,
                              scaling=d**-0.5)
    assert kept.shape[1] == lk
    expected = causal_attention(q, k, v, d**-0.5).transpose(0, 1)  # the same math on gathered (full) copies
    assert torch.allclose(out, expected, atol=layout_atol(expected), rtol=0)


def test_compressed_attention_is_causal():
    """Changing a kept token's value changes no output row before it (selection reads only Q and K)."""
    hq, hkv, lk, d = 4, 2, 120, 32
    q, k, v = _qkv(hq, hkv, lk, d, lk)
    options = dict(tau=0.2, window=16, pool_kernel=7, min_tokens=8, selection="query_head", scaling=d**-0.5)
    out, kept = tsa_attention(q, k, v, **options)
    position = int(kept[0, kept.shape[1] // 2])
    v2 = v.clone()
    v2[:, position] += 10.0
    out2, kept2 = tsa_attention(q, k, v2, **options)
    assert torch.equal(kept, kept2)
    assert torch.equal(out[:position], out2[:position])
    assert not torch.equal(out[position, 0], out2[position, 0])


def _compare_backends(shape, q_len, selection, dtype, device, brute, bound):
    hq, hkv, lk, d, w = shape
    q, k, v = _qkv(hq, hkv, lk, d, q_len, dtype=dtype, device=device)
    options = dict(tau=0.05, window=w, pool_kernel=7, min_tokens=min(64, lk // 4), selection=selection,
                   scaling=d**-0.5)
    out_t, kept_t = tsa_attention(q, k, v, backend="triton", **options)
    out_r, kept_r = tsa_attention(q, k, v, backend="torch", **options)
    assert kept_t.shape == kept_r.shape and kept_t.shape[1] < lk
    # scores differ by rounding, so a few borderline tokens may differ; nearly all must agree
    agreement = (_member(kept_t, hq, lk) == _member(kept_r, hq, lk)).float().mean().item()
    assert agreement > 0.99  # borderline tokens whose scores differ by rounding may swap; nearly all agree
    truth = brute.restricted_attention(q, k, v, kept_t, d**-0.5).transpose(0, 1)  # float64, same device
    assert brute.relative_error(out_t, truth) <= bound(q, k, v, kept_t, truth)


@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=shape_id)
def test_triton_backend_interpreted_matches_reference(shape, dtype, selection, brute):
    if torch.cuda.is_available():
        pytest.skip("covered at real shapes by the GPU test")
    bound = ATTENTION_RELATIVE[dtype]  # fp16: probabilities and output rounded (5 eps); fp32: accumulation
    _compare_backends(shape, shape[2], selection, dtype, "cpu", brute, lambda *args: bound)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("q_len", ["full", "chunk"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_triton_backend_on_gpu_within_twice_torch_error(shape, q_len, dtype, selection, brute):
    from tsa_patch.kernels.reference import compress_ref, decompress_ref, query_rows

    def twice_plain_torch(q, k, v, kept, truth):
        """2x the error of the PyTorch stages in the same dtype on the same kept set."""
        rows = query_rows(kept, q.shape[0], q.shape[1], k.shape[1])
        q_c, k_c, v_c = compress_ref(q, k, v, kept, rows)
        plain = decompress_ref(causal_attention(q_c, k_c, v_c, q.shape[-1] ** -0.5), rows, q.shape[1])
        return 2 * brute.relative_error(plain, truth)

    lk = shape[2]
    _compare_backends(shape, lk if q_len == "full" else lk // 3, selection, dtype, "cuda", brute, twice_plain_torch)
