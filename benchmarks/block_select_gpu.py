"""The block selection on a CUDA GPU, its PyTorch steps against its Triton twin (``triton_block_select``: the last
block's masses, then the pooled estimate, covers and index list in one kernel), and the whole block-sparse path
(Triton) against dense cuDNN: alone and with the GPU kept busy ahead (device time, launches hidden).

    python benchmarks/block_select_gpu.py --output benchmarks/results/block-select-H200-DATE.json

Shapes: Qwen2.5-Coder-0.5B (14 query / 2 KV heads, d 64) and Llama-3.1-8B (32 / 8, d 128) attention, bf16, random
inputs, FlexPrefill's settings (block 128, gamma 0.95, min budget 1024, JS 0.1), density forced to 0.2 (random inputs
have no block structure) after the whole selection has run.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels.block_sparse import block_pattern, block_sparse_prefill
from tsa_patch.kernels.dense import causal_attention, sdpa_backend

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
OPTIONS = dict(gamma=0.95, block=128, min_budget=1024, js_threshold=0.1, density=0.2)


def _timings(fn) -> dict:
    return {"alone_ms": round(time_cuda(fn, budget_s=0.2).median_ms, 4),
            "device_ms": round(time_cuda(fn, budget_s=0.2, busy_ahead=True).median_ms, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = []
    for name, (hq, hkv, d) in SHAPES.items():
        for length in map(int, args.lengths.split(",")):
            q = torch.randn(hq, length, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            options = dict(OPTIONS, scaling=d**-0.5)
            row = {"shape": name, "length": length}
            for backend in ("torch", "triton"):
                row[f"selection_{backend}"] = _timings(lambda: block_pattern(q, k, **options, backend=backend))
            row["path_triton"] = _timings(lambda: block_sparse_prefill(q, k, v, **options, backend="triton"))
            with sdpa_backend("cudnn", q.device):
                row["dense_cudnn"] = _timings(lambda: causal_attention(q, k, v, d**-0.5))
            row["path_vs_dense_device"] = round(row["dense_cudnn"]["device_ms"] / row["path_triton"]["device_ms"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    record = {**environment(), "command": " ".join(["python"] + sys.argv), "options": OPTIONS, "rows": rows}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
