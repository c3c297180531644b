"""The sync-free TSA path (tsa_patch/kernels/tsa.py ``tsa_attention_sync_free``): the same tokens and output as the
synced path, and, on a GPU, not one host synchronisation in a whole sparse layer, nor in a block-sparse one.

Bounds: the two paths compute the same attention on the same kept tokens, in another order; relative error
against float64 at most ``numerics.ATTENTION_RELATIVE`` (fp32: 128 eps).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from numerics import ATTENTION_RELATIVE

from tsa_patch.kernels import attention
from tsa_patch.kernels.policy import CONFIG_KEY, LayerPolicy, TsaPolicy
from tsa_patch.kernels.tsa import tsa_attention, tsa_attention_sync_free

OPTIONS = dict(tau=0.1, window=16, pool_kernel=7, min_tokens=16)
# The Triton backend runs its kernels on the GPU when there is one, else under the interpreter (conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("coverage", ["paper", "normalized"])
@pytest.mark.parametrize("selection", ["query_head", "kv_group"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sync_free_path_keeps_the_same_tokens_and_computes_the_same_output(backend, selection, coverage, brute):
    torch.manual_seed(7)
    hq, hkv, length, d = 6, 2, 131, 32
    q, k, v = (torch.randn(h, length, d).to(DEVICE) for h in (hq, hkv, hkv))
    options = dict(OPTIONS, selection=selection, coverage=coverage, scaling=d**-0.5)
    synced, kept = tsa_attention(q, k, v, backend="torch", **options)
    out, buffer, count = tsa_attention_sync_free(q, k, v, backend=backend, **options)
    assert kept.shape[1] < length, "tau = 0.1 must drop tokens here"
    assert count.tolist() == [kept.shape[1]] * kept.shape[0]
    assert torch.equal(buffer[:, : kept.shape[1]], kept)
    truth = brute.restricted_attention(q, k, v, kept, d**-0.5).transpose(0, 1)  # float64
    assert brute.relative_error(out, truth) < ATTENTION_RELATIVE[torch.float32]
    assert brute.relative_error(synced, truth) < ATTENTION_RELATIVE[torch.float32]


class _Attention(torch.nn.Module):
    def __init__(self, policy: TsaPolicy):
        super().__init__()
        self.config = type("Config", (), {})()
        setattr(self.config, CONFIG_KEY, policy.to_dict())
        self.layer_idx = 0
        self.num_key_value_groups = 4
        self.is_causal = True
        self.eval()


def _sparse_layer_inputs(length: int):
    policy = TsaPolicy.uniform(1, 0.05, window=128, min_tokens=256, activation_length=1024)
    return _Attention(policy), [torch.randn(1, heads, length, 128, device="cuda", dtype=torch.bfloat16)
                                for heads in (32, 8, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("length", [2048, 8191])
def test_a_sparse_layer_on_cuda_makes_no_host_sync(length):
    """A whole sparse layer through the attention function, sync-free path, under sync debugging."""
    module, (q, k, v) = _sparse_layer_inputs(length)
    out = _without_host_sync(module, q, k, v, tsa_sync_free=True)
    stats = attention.tsa_statistics(torch.nn.ModuleList([module]))  # reading the counts syncs: after the check
    assert stats[0]["path"] == "sparse" and stats[0]["kept"][0][0] < length
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_a_block_sparse_layer_on_cuda_makes_no_host_sync():
    """The block-sparse kernel alone: the block selection and the kernel run without a host sync; the density
    stays on the device until the statistics are read."""
    module, (q, k, v) = _sparse_layer_inputs(8192)
    _with_policy(module, layers=(LayerPolicy(kernel="block_sparse"),))
    out = _without_host_sync(module, q, k, v)
    stats = attention.tsa_statistics(torch.nn.ModuleList([module]))
    assert stats[0]["path"] == "block_sparse" and 0 < stats[0]["block_density"][0] <= 1
    assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_a_sparse_layer_replays_from_a_cuda_graph():
    """Captured in a CUDA graph, a sparse layer takes the sync-free path by itself; a replay on new inputs equals
    the sync-free path run eagerly on them (the same kernels, bit for bit) and the default synced path up to
    rounding: each is a bf16 rounding of the same attention on the same kept tokens, so 2 x the bf16 bound."""
    module, static = _sparse_layer_inputs(4096)
    warm_up = lambda: attention.tsa_attention_forward(module, *static, None, scaling=128**-0.5,  # noqa: E731
                                                      tsa_sync_free=True)
    captured, fresh = _replayed(module, static, warm_up)
    eager_sync_free, _ = attention.tsa_attention_forward(module, *fresh, None, scaling=128**-0.5, tsa_sync_free=True)
    synced, _ = attention.tsa_attention_forward(module, *fresh, None, scaling=128**-0.5)
    assert torch.isfinite(captured).all()
    assert torch.equal(captured, eager_sync_free)
    error = float((captured.float() - synced.float()).norm() / synced.float().norm())
    assert error < 2 * ATTENTION_RELATIVE[torch.bfloat16]


@pytest.mark.gpu
def test_a_block_sparse_layer_replays_from_a_cuda_graph():
    """The block-sparse path makes no host sync, so a CUDA graph holds it (what removes its launches on short
    prompts); a replay on new inputs equals the eager path on them: the same kernels on the same inputs. (The band
    masses are summed with atomics in any order: a block could flip only where a cover's cumulative mass falls
    within an ulp of its cut.)"""
    module, static = _sparse_layer_inputs(8192)
    _with_policy(module, layers=(LayerPolicy(kernel="block_sparse"),))
    captured, fresh = _replayed(module, static)
    eager, _ = attention.tsa_attention_forward(module, *fresh, None, scaling=128**-0.5)
    assert torch.isfinite(captured).all()
    assert torch.equal(captured, eager)


def _replayed(module, static: list, warm_up=None) -> tuple:
    """The layer's attention captured in a CUDA graph on ``static`` (q, k, v) after a warm-up on a side stream
    (compilation, autotuning; ``warm_up`` or the same call), then replayed on fresh random inputs copied into
    ``static``: the replay's output and those inputs."""
    forward = lambda: attention.tsa_attention_forward(module, *static, None, scaling=128**-0.5)[0]  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (warm_up or forward)()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward()
    fresh = [torch.randn_like(x) for x in static]
    for buffer, x in zip(static, fresh):
        buffer.copy_(x)
    graph.replay()
    return captured, fresh


@pytest.mark.gpu
def test_an_all_rows_layer_on_cuda_makes_no_host_sync_and_replays_from_a_cuda_graph():
    """``rows="all"`` in eager mode: selection, the K/V gather, the query blocks' key bounds and the kept-keys
    kernel run without a host sync (the computed share stays on the device until the statistics are read); so a
    CUDA graph holds it, and a replay on new inputs equals the eager path on them (the same kernels)."""
    module, (q, k, v) = _sparse_layer_inputs(8192)
    _with_policy(module, rows="all")
    out = _without_host_sync(module, q, k, v)
    stats = attention.tsa_statistics(torch.nn.ModuleList([module]))
    assert stats[0]["path"] == "sparse" and stats[0]["kept"][0][0] < 8192
    assert 0 < stats[0]["attention_cost"][0] < 1 and torch.isfinite(out).all()
    module, static = _sparse_layer_inputs(4096)
    _with_policy(module, rows="all")
    captured, fresh = _replayed(module, static)
    eager, _ = attention.tsa_attention_forward(module, *fresh, None, scaling=128**-0.5)
    assert torch.isfinite(captured).all() and torch.equal(captured, eager)


def _with_policy(module, **changes) -> None:
    """Replace fields of the layer's policy (in its config)."""
    policy = TsaPolicy.from_dict(getattr(module.config, CONFIG_KEY))
    setattr(module.config, CONFIG_KEY, replace(policy, **changes).to_dict())


def _without_host_sync(module, q, k, v, **kwargs):
    """The layer's attention output, run once to compile and tune, then again under sync debugging (any host
    synchronisation raises)."""
    attention.tsa_attention_forward(module, q, k, v, None, scaling=128**-0.5, **kwargs)  # compile, tune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return attention.tsa_attention_forward(module, q, k, v, None, scaling=128**-0.5, **kwargs)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
