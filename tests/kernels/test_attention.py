"""tsa_attention_forward: the transformers contract, padding, chunked prefill, dense fallbacks, statistics."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tsa_patch.kernels.attention import STATS_ATTR, emulate_block_sparse_, tsa_attention_forward
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy
from tsa_patch.kernels.tsa import tsa_attention
from numerics import ATTENTION_RELATIVE, layout_atol


class _Config:
    pass


class _Attention(torch.nn.Module):
    """The attributes of a transformers attention module that the attention function reads."""

    def __init__(self, policy: TsaPolicy, layer_idx: int = 0, groups: int = 2):
        super().__init__()
        self.config = _Config()
        setattr(self.config, CONFIG_KEY, policy.to_dict())
        self.layer_idx = layer_idx
        self.num_key_value_groups = groups
        self.is_causal = True
        self.eval()


POLICY = TsaPolicy.uniform(2, 0.1, [0], window=8, min_tokens=4, activation_length=32)
OPTIONS = dict(tau=0.1, window=8, pool_kernel=7, min_tokens=4, selection="query_head")


def _padded_mask(lengths, kv_len, q_len, left=True):
    """sdpa-style bool mask (B, 1, Lq, Lk): causal (bottom-right aligned) and real keys only."""
    batch = len(lengths)
    valid = torch.zeros(batch, kv_len, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            valid[b, kv_len - n :] = True
        else:
            valid[b, :n] = True
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return causal[None, None] & valid[:, None, None, :]


@pytest.mark.parametrize("q_len", [None, 40])
def test_left_padded_batch_gives_each_sequence_its_alone_result(q_len):
    torch.manual_seed(0)
    lengths, kv_len, d = [97, 61, 20], 97, 16
    q_len = kv_len if q_len is None else q_len
    module = _Attention(POLICY)
    q, k, v = torch.randn(3, 4, q_len, d), torch.randn(3, 2, kv_len, d), torch.randn(3, 2, kv_len, d)
    out, weights = tsa_attention_forward(module, q, k, v, _padded_mask(lengths, kv_len, q_len), scaling=d**-0.5)
    assert weights is None and out.shape == (3, q_len, 4, d) and out.is_contiguous()
    stats = getattr(module, STATS_ATTR)
    for b, n in enumerate(lengths):
        alone_q = q[b : b + 1, :, max(0, q_len - n) :]
        alone_kv = (k[b : b + 1, :, kv_len - n :], v[b : b + 1, :, kv_len - n :])
        # as transformers calls it: no mask for a full prefill, a bottom-right causal mask for a chunk
        mask = None if alone_q.shape[2] == n else _padded_mask([n], n, alone_q.shape[2])
        alone, _ = tsa_attention_forward(module, alone_q, *alone_kv, mask, scaling=d**-0.5)
        rows = alone.shape[1]
        assert torch.allclose(out[b, q_len - rows :], alone[0], atol=layout_atol(alone), rtol=0), f"sequence {b}"
        if n < POLICY.activation_length:
            assert stats["kept"][b] is None  # too short alone: dense, also inside the batch
        else:
            assert stats["kept"][b] == getattr(module, STATS_ATTR)["kept"][0]


def test_right_padding_matches_alone():
    torch.manual_seed(1)
    lengths, kv_len, d = [80, 50], 80, 16
    module = _Attention(POLICY)
    q, k, v = torch.randn(2, 4, kv_len, d), torch.randn(2, 2, kv_len, d), torch.randn(2, 2, kv_len, d)
    out, _ = tsa_attention_forward(module, q, k, v, _padded_mask(lengths, kv_len, kv_len, left=False),
                                   scaling=d**-0.5)
    alone, _ = tsa_attention_forward(module, q[1:, :, :50], k[1:, :, :50], v[1:, :, :50], None, scaling=d**-0.5)
    assert torch.allclose(out[1, :50], alone[0], atol=layout_atol(alone), rtol=0)
    assert (out[1, 50:] == 0).all()  # padded query rows are never computed


def test_unpadded_batch_runs_the_reference_per_sequence():
    torch.manual_seed(2)
    module = _Attention(POLICY)
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    out, _ = tsa_attention_forward(module, q, k, v, None, scaling=0.25)
    for b in range(2):
        ref, kept = tsa_attention(q[b], k[b], v[b], scaling=0.25, **OPTIONS)
        assert torch.equal(out[b], ref)
        assert getattr(module, STATS_ATTR)["kept"][b] == [kept.shape[1]] * 4


@pytest.mark.parametrize("case", ["decode", "dense_layer", "short_prompt", "training"])
def test_dense_paths_equal_sdpa(case):
    torch.manual_seed(3)
    module = _Attention(POLICY, layer_idx=1 if case == "dense_layer" else 0)
    if case == "training":
        module.train()
    q_len, kv_len = {"decode": (1, 64), "short_prompt": (20, 20)}.get(case, (64, 64))
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    out, _ = tsa_attention_forward(module, q, k, v, None, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert torch.equal(out, ref)


def test_static_cache_prefill_without_mask_uses_the_filled_prefix():
    """transformers passes no mask for a prefill into an empty static cache (keys beyond the prompt are empty)."""
    torch.manual_seed(4)
    module = _Attention(POLICY)
    q, k, v = torch.randn(1, 4, 60, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    k[:, :, 60:], v[:, :, 60:] = 0.0, 0.0  # the static cache's empty tail
    out, _ = tsa_attention_forward(module, q, k, v, None, scaling=0.25)
    ref, _ = tsa_attention_forward(module, q, k[:, :, :60], v[:, :, :60], None, scaling=0.25)
    assert torch.equal(out, ref)


def test_policy_errors_are_reported_by_field():
    module = _Attention(POLICY)
    getattr(module.config, CONFIG_KEY)["layers"][0]["tau"] = 1.5
    with pytest.raises(ValueError, match=r"layers\[0\]\.tau"):
        tsa_attention_forward(module, torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16),
                              torch.randn(1, 2, 64, 16), None)


def test_import_does_not_initialise_cuda():
    code = (
        "import torch\n"
        "def fail(*a, **k): raise RuntimeError('CUDA initialised at import')\n"
        "torch.cuda.init = fail; torch.cuda._lazy_init = fail\n"
        "import tsa_patch.kernels.modeling_tsa, tsa_patch.kernels.attention\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_padded_batch_on_gpu_uses_triton_and_matches_each_sequence_alone(dtype):
    """On CUDA the sparse path runs the Triton stages; a left-padded batch still equals each sequence alone."""
    policy = TsaPolicy.uniform(1, 0.05, window=64, min_tokens=128, activation_length=256)
    module = _Attention(policy)
    lengths, kv_len, d = [3001, 1777], 3001, 128
    q, k, v = (torch.randn(2, heads, kv_len, d, device="cuda", dtype=dtype) for heads in (32, 8, 8))
    module.num_key_value_groups = 4
    mask = _padded_mask(lengths, kv_len, kv_len).cuda()
    out, _ = tsa_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    assert torch.isfinite(out).all()
    for b, n in enumerate(lengths):
        alone, _ = tsa_attention_forward(module, q[b : b + 1, :, -n:], k[b : b + 1, :, -n:], v[b : b + 1, :, -n:],
                                         None, scaling=d**-0.5)
        # same kernels on the same values; the dense kernel may pick another algorithm for another layout, which
        # rounds the half-precision output (and its probabilities) differently: a few eps of the dtype
        assert torch.allclose(out[b, kv_len - n :].float(), alone[0].float(), atol=layout_atol(alone, 4), rtol=0)


def _block_sparse_case(tsa: bool, length: int, d: int):
    """A module whose layer 0 runs the block-sparse kernel (on TSA's compact tensors when `tsa`), and random Q/K/V."""
    layer = {"enabled": tsa, "tau": 0.1 if tsa else 0.0, "kernel": "block_sparse"}
    policy = TsaPolicy.from_dict({**POLICY.to_dict(), "layers": [layer, {"enabled": False, "tau": 0.0}],
                                  "block_size": 16, "block_gamma": 0.8, "block_min_budget": 16})
    q, k, v = torch.randn(1, 4, length, d), torch.randn(1, 2, length, d), torch.randn(1, 2, length, d)
    return _Attention(policy), q, k, v


@pytest.mark.parametrize("tsa", [False, True], ids=["block-sparse-alone", "tsa+block-sparse"])
def test_block_sparse_layer_runs_dense_on_cpu_unless_emulated(tsa):
    torch.manual_seed(4)
    d = 16
    module, q, k, v = _block_sparse_case(tsa, 160, d)
    plain, _ = tsa_attention_forward(module, q, k, v, None, scaling=d**-0.5)
    if not tsa:  # CPU without emulation: exactly the dense SDPA path
        dense, _ = sdpa_attention_forward(module, q, k, v, None, scaling=d**-0.5)
        assert torch.equal(plain, dense) and getattr(module, STATS_ATTR)["path"] == "dense"
    emulate_block_sparse_(module)
    out, _ = tsa_attention_forward(module, q, k, v, None, scaling=d**-0.5)
    stats = getattr(module, STATS_ATTR)
    assert stats["path"] == ("sparse" if tsa else "block_sparse")
    assert 0 < stats["block_density"][0] < 1
    from tsa_patch.kernels.block_sparse import block_sparse_prefill

    if tsa:  # the block-sparse kernel ran on the compact tensors: same selection as TSA alone, then blocks
        expected, _ = tsa_attention(q[0], k[0], v[0], scaling=d**-0.5, **OPTIONS, attend=lambda a, b, c:
                                    block_sparse_prefill(a, b, c, gamma=0.8, block=16, min_budget=16,
                                                           js_threshold=0.1, scaling=d**-0.5)[0])
    else:
        expected = block_sparse_prefill(q[0], k[0], v[0], gamma=0.8, block=16, min_budget=16, js_threshold=0.1,
                                          scaling=d**-0.5)[0].transpose(0, 1)
    assert torch.allclose(out[0], expected, atol=layout_atol(expected), rtol=0)
    assert not torch.allclose(out, plain, atol=1e-3)  # blocks were really skipped: far beyond rounding


@pytest.mark.parametrize("has_triton", [False, True])
def test_block_sparse_kernel_needs_cuda_and_triton_and_is_emulated_elsewhere_on_request(has_triton, monkeypatch):
    from tsa_patch.kernels import attention

    monkeypatch.setattr(attention, "HAS_TRITON", has_triton)
    assert attention.block_sparse_kernel_available(torch.device("cuda")) is has_triton
    assert attention.block_sparse_kernel_available(torch.device("cpu")) is False
    cpu = torch.device("cpu")
    assert attention._block_sparse_backend(cpu, emulate=False) is None  # dense attention
    assert attention._block_sparse_backend(cpu, emulate=True) == "torch"
    # the backend follows the availability test alone (so CUDA without Triton emulates on request, too)
    monkeypatch.setattr(attention, "block_sparse_kernel_available", lambda device: True)
    assert attention._block_sparse_backend(cpu, emulate=False) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("tsa", [False, True], ids=["block-sparse-alone", "tsa+block-sparse"])
def test_block_sparse_layer_on_cuda_matches_the_emulated_cpu_path(tsa):
    torch.manual_seed(5)
    d = 64
    module, q, k, v = _block_sparse_case(tsa, 700, d)
    emulate_block_sparse_(module)
    cpu, _ = tsa_attention_forward(module, q, k, v, None, scaling=d**-0.5)
    gpu, _ = tsa_attention_forward(module, q.cuda(), k.cuda(), v.cuda(), None, scaling=d**-0.5)
    assert getattr(module, STATS_ATTR)["block_density"][0] < 1
    # fp32 on both: the same block pattern, accumulated in another order (GPU tiles vs CPU SDPA per head)
    assert ((gpu.cpu() - cpu).norm() / cpu.norm()).item() < ATTENTION_RELATIVE[torch.float32]


def test_dense_everywhere_is_layer_path_dense_in_every_layer():
    """The model-level shortcut (an export's native SDPA path) agrees with the per-layer decision: TSA layers
    engage from the window and the activation length, block-sparse layers on full prefills only."""
    from tsa_patch.kernels.attention import dense_everywhere
    from dataclasses import asdict

    from tsa_patch.kernels.policy import LayerPolicy

    tsa = TsaPolicy.uniform(3, 0.05, [1], window=16, min_tokens=16, activation_length=64)
    assert dense_everywhere(tsa, 63, 63) and dense_everywhere(tsa, 8, 200)  # too short; a chunk below the window
    assert not dense_everywhere(tsa, 64, 64) and not dense_everywhere(tsa, 16, 200)
    blocks = TsaPolicy.from_dict({**tsa.to_dict(), "layers": [
        asdict(LayerPolicy(enabled=False, tau=0.0, kernel="block_sparse")), *[asdict(LayerPolicy())] * 2]})
    assert not dense_everywhere(blocks, 200, 200)  # a full prefill runs the block-sparse kernel
    assert dense_everywhere(blocks, 32, 200)  # a chunk over a longer cache attends densely there
    assert dense_everywhere(TsaPolicy.uniform(3, 0.0, [], window=16, activation_length=64), 500, 500)  # no sparse layer
    late = TsaPolicy(layers=(LayerPolicy(enabled=True, tau=0.05, activation_length=256),) * 2, window=16,
                     activation_length=64)
    assert dense_everywhere(late, 200, 200) and not dense_everywhere(late, 256, 256)  # the layers' own length


def test_a_new_policy_at_a_recycled_id_is_never_served_the_old_policy():
    """A later layer reads the policy without rechecking it (``recheck=False``), and in calibration the first layer
    may be replayed from a trace and never recheck. Were a freed policy dict's id reused by the next policy's dict,
    the cache would serve the old policy (a calibration once measured a dense policy for a sparse one that way).
    The entry for an id that now belongs to another dict is stale by identity, whatever its contents."""
    from types import SimpleNamespace

    from tsa_patch.kernels import attention

    dense, sparse = TsaPolicy.uniform(3, 0.0).to_dict(), TsaPolicy.uniform(3, 0.05, [1]).to_dict()
    config = SimpleNamespace(tsa_policy=sparse)
    # what a recycled id looks like: an entry under this dict's id that was made for another dict
    attention._POLICY_CACHE[id(sparse)] = (dense, dict(dense), TsaPolicy.from_dict(dense))
    assert attention.policy_from_config(config, recheck=False).sparse_layers == [1]
    for i in range(3 * attention._POLICY_CACHE_SIZE):  # new dicts every time, as apply_policy_ makes them
        config.tsa_policy = TsaPolicy.uniform(3, 0.01 * (1 + i % 3), [i % 3]).to_dict()
        policy = attention.policy_from_config(config, recheck=False)
        assert policy.sparse_layers == [i % 3] and policy.layers[i % 3].tau == 0.01 * (1 + i % 3)
    assert len(attention._POLICY_CACHE) <= attention._POLICY_CACHE_SIZE
