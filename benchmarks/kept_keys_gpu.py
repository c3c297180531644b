"""Kept-keys attention (``rows="all"``) on a GPU: the kernel's throughput against cuDNN, and one sparse layer both ways.

    python benchmarks/kept_keys_gpu.py --output benchmarks/results/kept-keys-H200-DATE.json

Random bf16 inputs, batch 1, Qwen2.5-0.5B attention shapes (14 query / 2 KV heads, d 64) and Llama-3.1-8B's (32 / 8,
d 128). For each length and kept fraction (forced, of the candidates; the window is kept too), in one run on one card:

- ``dense``: causal SDPA with cuDNN (the runtime's dense kernel);
- ``kernel``: ``triton_kept_keys.kept_keys_attention`` alone on that kept set (gather included), and its share of
  dense causal attention computed (``kept_keys_cost``): throughput = cost x dense time / kernel time, 1.0 = cuDNN's;
- ``layer_kept`` / ``layer_all``: a whole TSA layer as the runtime runs it, the paper's compression (``tsa_attention``,
  one host sync, cuDNN on the compact tensors) and every row kept (``tsa_attention_kept_keys``, no sync); each timed
  alone (host launches exposed) and behind a busy GPU (device time, as inside a long prefill).
The kernel and ``layer_all`` run with ``--local-keys`` (calibration's default 128; their cost counts them).
Also checks the kernel against its PyTorch twin up to 32K (relative error, bf16 bound 3 eps). ``--tilings`` also
times the kernel at each listed launch shape (block_m/block_n/warps/stages) on the first fraction, to choose the
default.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.reference import kept_keys_attention_ref, kept_keys_cost, select_tokens_padded_ref
from tsa_patch.kernels.triton_block import Tiling
from tsa_patch.kernels.triton_kept_keys import kept_keys_attention
from tsa_patch.kernels.tsa import tsa_attention, tsa_attention_kept_keys

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
OPTIONS = dict(tau=0.005, window=128, pool_kernel=7, min_tokens=1024, selection="query_head", backend="triton")


def bench(model: str, seq_len: int, fraction: float, local_keys: int, tilings: list[str]) -> dict:
    heads, kv_heads, head_dim = SHAPES[model]
    q = torch.randn(heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scaling = head_dim**-0.5
    candidates = seq_len - OPTIONS["window"]
    pooled = torch.rand(heads, candidates, device="cuda")
    kept, count = select_tokens_padded_ref(pooled, seq_len, 0.0, 0, keep=round(fraction * candidates))
    row = {"model": model, "seq_len": seq_len, "kept_fraction": fraction, "local_keys": local_keys,
           "cost": kept_keys_cost(kept, count, seq_len, local_keys).item()}
    if seq_len <= 32768:  # the float32 twin takes seconds beyond
        out, _ = kept_keys_attention(q, k, v, kept, count, scaling, local_keys)
        ref = kept_keys_attention_ref(q, k, v, kept, count, scaling, local_keys=local_keys, rows_per_step=512)
        row["relative_error_vs_twin"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert torch.isfinite(out).all() and row["relative_error_vs_twin"] < 3 * torch.finfo(torch.bfloat16).eps
        del out, ref
    with sdpa_backend("cudnn", q.device):
        row["dense_ms"] = time_cuda(lambda: causal_attention(q, k, v, scaling)).median_ms
    row["kernel_ms"] = time_cuda(lambda: kept_keys_attention(q, k, v, kept, count, scaling, local_keys)).median_ms
    row["kernel_vs_cudnn_throughput"] = row["cost"] * row["dense_ms"] / row["kernel_ms"]
    for shape in tilings:  # block_m/block_n/warps/stages
        block_m, block_n, warps, stages = (int(x) for x in shape.split("/"))
        tiling = Tiling(block_n, warps, stages)
        ms = time_cuda(lambda: kept_keys_attention(q, k, v, kept, count, scaling, local_keys, block_m=block_m,
                                                   tiling=tiling)).median_ms
        row.setdefault("tilings", {})[shape] = {"kernel_ms": ms, "throughput": row["cost"] * row["dense_ms"] / ms}
    options = dict(OPTIONS, scaling=scaling, keep_fraction=fraction)
    with sdpa_backend("auto", q.device):
        for name, layer in (("layer_kept", lambda: tsa_attention(q, k, v, **options)),
                            ("layer_all", lambda: tsa_attention_kept_keys(q, k, v, local_keys=local_keys, **options))):
            row[f"{name}_ms"] = time_cuda(layer).median_ms
            row[f"{name}_device_ms"] = time_cuda(layer, busy_ahead=True).median_ms
    with sdpa_backend("cudnn", q.device):
        row["dense_device_ms"] = time_cuda(lambda: causal_attention(q, k, v, scaling), busy_ahead=True).median_ms
    for name in ("layer_kept", "layer_all"):
        row[f"{name}_speedup"] = row["dense_device_ms"] / row[f"{name}_device_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768,131072")
    parser.add_argument("--fractions", default="0.3,0.5,0.7,1.0")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--local-keys", type=int, default=128)
    parser.add_argument("--tilings", default="", help="comma-separated block_m/block_n/warps/stages to time too")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for model in args.models.split(","):
        for seq_len in (int(n) for n in args.lengths.split(",")):
            if model == "qwen2.5-0.5b" and seq_len > 32768:
                continue  # its context is 32K
            for i, fraction in enumerate(float(f) for f in args.fractions.split(",")):
                tilings = args.tilings.split(",") if args.tilings and i == 0 else []
                row = bench(model, seq_len, fraction, args.local_keys, tilings)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                rows.append(row)
                torch.cuda.empty_cache()
    with open(args.output, "w") as f:
        json.dump({**environment(), "command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)
    print(f"{'model':14} {'L':>7} {'kept':>5} {'cost':>5} {'dense':>7} {'kernel':>7} {'thru':>5} "
          f"{'kept-rows':>9} {'all-rows':>8} (device-time speedups vs cuDNN)")
    for r in rows:
        print(f"{r['model']:14} {r['seq_len']:7} {r['kept_fraction']:5.2f} {r['cost']:5.2f} {r['dense_ms']:7.2f} "
              f"{r['kernel_ms']:7.2f} {r['kernel_vs_cudnn_throughput']:5.2f} {r['layer_kept_speedup']:9.2f} "
              f"{r['layer_all_speedup']:8.2f}")


if __name__ == "__main__":
    main()
