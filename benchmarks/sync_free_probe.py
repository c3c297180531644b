"""Which attention kernel can the sync-free TSA path use, and where does a sparse layer's fixed cost go? One layer at
Llama-3.1-8B shapes (32/8 heads, d 128, bf16) on the GPU, the kept fraction of ``tsa-patch bench``'s operating point.

For each length it times (median of CUDA-event runs; ratios against dense cuDNN measured in the same run):

- dense causal attention with cuDNN (the baseline) and on the compact tensors (what the synced path attends with);
- the varlen entry points on a padded buffer whose true length lives on the device (``cum_seq`` tensors, no sync):
  cuDNN's and flash's, checked against the compact cuDNN result (relative error), and under
  ``torch.cuda.set_sync_debug_mode("error")``;
- the whole sync-free layer with each of them, eager and as a CUDA graph replay, against today's two paths;
- the selection stage alone, eager and as a graph (how much of it is launches);
- the runtime's dense path against transformers' own SDPA forward (CPU microseconds per call).

    python benchmarks/sync_free_probe.py [--lengths 4096,8192,16384,32768,131072] [--out probe.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sync_check import StubAttention  # benchmarks/ is on the path of a script run from it
from tsa_patch.bench import environment, paper_kept_fraction, time_cuda, time_cuda_graph
from tsa_patch.kernels import attention
from tsa_patch.kernels.policy import TsaPolicy
from tsa_patch.kernels.reference import select_tokens_padded_ref
from tsa_patch.kernels.triton_select import select_tokens_padded
from tsa_patch.kernels.tsa import token_scores, tsa_attention, tsa_attention_sync_free

HEADS, KV_HEADS, DIM = 32, 8, 128
SCALE = DIM**-0.5


def cudnn_dense(q, k, v):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=SCALE,
                                              enable_gqa=q.shape[0] != k.shape[0])[0]


def varlen(kernel: str, q_lhd, k_lhd, v_lhd, cum, max_len):
    """Causal attention of one sequence of length cum[1] (on the device) held in (max_len, H, D) buffers."""
    if kernel == "cudnn":
        return torch.ops.aten._cudnn_attention_forward(q_lhd, k_lhd, v_lhd, None, cum, cum, max_len, max_len, False,
                                                       0.0, True, False, scale=SCALE)[0]
    return torch.ops.aten._flash_attention_forward(q_lhd, k_lhd, v_lhd, cum, cum, max_len, max_len, 0.0, True,
                                                   False, scale=SCALE)[0]


def sync_free_layer(kernel: str, q, k, v, options):
    """Score, smooth, count and select on the device; gather Q/K/V into padded (L, Hq, D) buffers; varlen
    attention; scatter the kept rows back (dropped rows 0). q (Hq, L, D), k/v (Hkv, L, D)."""
    length = q.shape[1]
    pooled = token_scores(q, k, window=options["window"], pool_kernel=options["pool_kernel"], selection="query_head",
                          scaling=SCALE, backend="triton")
    keep = round(options["keep_fraction"] * pooled.shape[1])
    kept, count = select_tokens_padded_ref(pooled, length, options["tau"], options["min_tokens"], "paper", keep)
    rows = kept.T  # (L, Hq)
    heads = torch.arange(HEADS, device=q.device)
    group = heads // (HEADS // KV_HEADS)
    q_c = q.transpose(0, 1)[rows, heads]  # (L, Hq, D)
    k_c = k.transpose(0, 1)[rows, group]
    v_c = v.transpose(0, 1)[rows, group]
    cum = torch.stack([count[:1] * 0, count[:1]]).view(2).to(torch.int32)
    out_c = varlen(kernel, q_c, k_c, v_c, cum, length)
    valid = torch.arange(length, device=q.device)[:, None] < count[None, :]
    target = torch.where(valid, rows, length)  # invalid slots land in a discard row
    out = q.new_zeros(length + 1, HEADS, DIM)
    out[target, heads] = out_c
    return out[:length]


def graph_time(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (``tsa-patch bench``'s capture); raises if capture fails."""
    timing = time_cuda_graph(fn)
    if "median_ms" not in timing:
        raise RuntimeError(timing["error"])
    return timing["median_ms"]


def no_sync(fn) -> str:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def relative(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def probe_length(length: int) -> dict:
    torch.manual_seed(length)
    q = torch.randn(HEADS, length, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(KV_HEADS, length, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(KV_HEADS, length, DIM, device="cuda", dtype=torch.bfloat16)
    fraction = paper_kept_fraction(length)
    options = dict(tau=0.005, window=128, pool_kernel=13, min_tokens=1024, keep_fraction=fraction)
    row = {"seq_len": length, "kept_fraction": fraction}
    dense = time_cuda(lambda: cudnn_dense(q, k, v)).median_ms
    row["dense_cudnn_ms"] = dense
    kept_len = round(fraction * (length - 128)) + 128
    q_c = q[:, :kept_len].contiguous()
    k_c = k.repeat_interleave(HEADS // KV_HEADS, 0)[:, :kept_len].contiguous()
    v_c = v.repeat_interleave(HEADS // KV_HEADS, 0)[:, :kept_len].contiguous()
    reference = cudnn_dense(q_c, k_c, v_c)  # (Hq, K', D)
    row["compact_cudnn_ms"] = time_cuda(lambda: cudnn_dense(q_c, k_c, v_c)).median_ms
    buffers = [torch.cat([x, torch.randn(HEADS, length - kept_len, DIM, device="cuda", dtype=x.dtype)], 1)
               .transpose(0, 1).contiguous() for x in (q_c, k_c, v_c)]  # (L, Hq, D), garbage past K'
    cum = torch.tensor([0, kept_len], device="cuda", dtype=torch.int32)
    for kernel in ("cudnn", "flash"):
        try:
            out = varlen(kernel, *buffers, cum, length)
            row[f"varlen_{kernel}_error"] = relative(out[:kept_len].transpose(0, 1), reference)
            row[f"varlen_{kernel}_finite"] = bool(out[:kept_len].isfinite().all())
            row[f"varlen_{kernel}_ms"] = time_cuda(lambda: varlen(kernel, *buffers, cum, length)).median_ms
            row[f"varlen_{kernel}_sync"] = no_sync(lambda: varlen(kernel, *buffers, cum, length))
            layer = lambda: sync_free_layer(kernel, q, k, v, options)  # noqa: E731
            row[f"layer_{kernel}_error_vs_synced"] = relative(
                layer(), tsa_attention(q, k, v, selection="query_head", scaling=SCALE, backend="triton",
                                       coverage="paper", **options)[0])
            row[f"layer_{kernel}_ms"] = time_cuda(layer).median_ms
            row[f"layer_{kernel}_graph_ms"] = graph_time(layer)
            row[f"layer_{kernel}_sync"] = no_sync(layer)
        except Exception as error:  # noqa: BLE001 - a probe: record what failed and go on
            row[f"varlen_{kernel}_failed"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    synced = lambda: tsa_attention(q, k, v, selection="query_head", scaling=SCALE, backend="triton",  # noqa: E731
                                   coverage="paper", **options)
    gathered = lambda: tsa_attention_sync_free(q, k, v, selection="query_head", scaling=SCALE,  # noqa: E731
                                               backend="triton", coverage="paper", **options)
    row["layer_synced_ms"] = time_cuda(synced).median_ms
    row["layer_gathered_ms"] = time_cuda(gathered).median_ms
    row["layer_gathered_graph_ms"] = graph_time(gathered)
    pooled = token_scores(q, k, window=128, pool_kernel=13, selection="query_head", scaling=SCALE, backend="triton")
    keep = round(fraction * pooled.shape[1])
    row["score_smooth_ms"] = time_cuda(lambda: token_scores(q, k, window=128, pool_kernel=13, selection="query_head",
                                                            scaling=SCALE, backend="triton")).median_ms
    padded = lambda: select_tokens_padded(pooled, length, 0.005, 1024, "paper", keep)  # noqa: E731
    row["select_synced_ms"] = time_cuda(lambda: int(padded()[1][0])).median_ms  # with the synced path's read-back
    row["select_padded_ms"] = time_cuda(padded).median_ms
    row["select_padded_graph_ms"] = graph_time(padded)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(20):
        padded()
    row["select_padded_cpu_us"] = (time.perf_counter() - begin) / 20 * 1e6
    torch.cuda.synchronize()
    for key, value in list(row.items()):
        if key.endswith("_ms") and key != "dense_cudnn_ms":
            row[key.replace("_ms", "_vs_dense")] = dense / value
    return row


def dense_path_overhead() -> dict:
    """CPU time per call of a layer that runs dense (prompt below the activation length): the runtime's forward
    against transformers' SDPA forward, Qwen2.5-0.5B shapes at 1K (14/2 heads, d 64)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tsa_patch.kernels.dense import model_sdpa_backend

    module = StubAttention(TsaPolicy.uniform(1, 0.005, window=128, min_tokens=1024, activation_length=32000), groups=7)
    attention.mark_tsa_runtime_(module)
    q = torch.randn(1, 14, 1024, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    result = {}
    for _round in range(3):
        for name, fn in (("sdpa", sdpa_attention_forward), ("tsa_dense_path", attention.tsa_attention_forward),
                         ("tsa_dense_path_in_model_forward", attention.tsa_attention_forward)):
            # an export's forward sets SDPA's order once for all its layers (modeling_tsa.py)
            with model_sdpa_backend("auto", q.device) if name.endswith("model_forward") else contextlib.nullcontext():
                for _ in range(20):
                    fn(module, q, k, v, None, scaling=0.125)
                torch.cuda.synchronize()
                begin = time.perf_counter()
                for _ in range(500):
                    fn(module, q, k, v, None, scaling=0.125)
                torch.cuda.synchronize()
            result.setdefault(name + "_us", []).append((time.perf_counter() - begin) / 500 * 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768,131072")
    parser.add_argument("--out", default="sync-free-probe.json")
    parser.add_argument("--overhead-only", action="store_true", help="only the dense path's CPU cost per call")
    args = parser.parse_args()
    record = {**environment(), "command": "python benchmarks/sync_free_probe.py --lengths " + args.lengths,
              "dense_path_overhead": dense_path_overhead(), "layers": []}
    print(json.dumps(record["dense_path_overhead"]), flush=True)
    for length in ([] if args.overhead_only else (int(n) for n in args.lengths.split(","))):
        row = probe_length(length)
        record["layers"].append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
