"""Launch shapes of the block-sparse kernel on a CUDA GPU: each ``Tiling`` (keys per inner step, warps, pipeline
stages) on a full causal block map and on a 20 % map, against dense cuDNN in the same run.

    python benchmarks/block_tiling_gpu.py --output benchmarks/results/block-tiling-H200-DATE.json

Shapes: Qwen2.5-Coder-0.5B (14 query / 2 KV heads, d 64) and Llama-3.1-8B (32 / 8, d 128) attention, bf16, random
inputs, block 128. The full map measures the kernel's throughput against cuDNN's (the same FLOPs); the 20 % map
(each query block keeps a random fifth of its causal key blocks, and the sink and diagonal blocks) what a sparse
layer runs. Each tiling runs on both of the kernel's paths (``descriptors``: the tensor-descriptor kernel that
Hopper-class GPUs take for 16-bit inputs, and the portable one), checked against each other on the same inputs. The
fastest tiling per shape, on the path the card takes, is what ``triton_block.default_tiling`` should return.

The descriptor kernel was first measured as a candidate, beside a pointer-load kernel in FlashAttention-2's order and
a warp-specialised one, by ``benchmarks/block_kernel_variants_gpu.py`` (commit 497e3ef, since folded into this
script; ``results/block-kernel-variants-H200-20261204.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels.block_sparse import block_lists
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.triton_block import Tiling, block_sparse_attention, default_tiling

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
BLOCK = 128
TILINGS = [Tiling(n, w, s) for n, w, s in itertools.product((64, 128), (4, 8), (1, 2, 3, 4))]


def random_map(heads: int, blocks: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``BlockPattern``'s index and count for a random causal map keeping ``density`` of each row, sink and
    diagonal always."""
    rows = torch.arange(blocks, device="cuda")
    mask = torch.rand(heads, blocks, blocks, device="cuda") < density
    mask |= (rows[:, None] == rows[None, :]) | (rows[None, :] == 0)
    return block_lists(mask & (rows[None, :] <= rows[:, None]))


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y|| in fp32; NaN if either holds a NaN."""
    return float((x.float() - y.float()).norm() / y.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--default-only", action="store_true", help="time only default_tiling's shape (both paths)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = []
    for (name, (hq, hkv, d)), length in itertools.product(SHAPES.items(), map(int, args.lengths.split(","))):
        q = torch.randn(hq, length, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with sdpa_backend("cudnn", q.device):
            dense_ms = time_cuda(lambda: causal_attention(q, k, v, d**-0.5), budget_s=0.5).median_ms
        blocks = -(-length // BLOCK)
        maps = {density: random_map(hq, blocks, density) for density in (1.0, 0.2)}
        default = default_tiling(BLOCK, d, q.dtype)
        portable = {density: block_sparse_attention(q, k, v, *m, BLOCK, d**-0.5, descriptors=False)
                    for density, m in maps.items()}
        for descriptors, tiling in itertools.product((False, True), [default] if args.default_only else TILINGS):
            row = {"shape": name, "length": length, "descriptors": descriptors, "tiling": tiling._asdict(),
                   "default": tiling == default, "dense_cudnn_ms": round(dense_ms, 4)}
            for density, (index, count) in maps.items():

                def run():
                    return block_sparse_attention(q, k, v, index, count, BLOCK, d**-0.5, tiling, descriptors)

                try:
                    error = relative(run(), portable[density])
                    ms = time_cuda(run, budget_s=0.3).median_ms
                except Exception as err:  # noqa: BLE001 - a tiling that does not fit the card is recorded, not fatal
                    row[f"density_{density}"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                    continue
                row[f"density_{density}"] = {"ms": round(ms, 4), "vs_dense": round(dense_ms / ms, 3),
                                             "error_vs_portable": error}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del q, k, v, maps, portable
        torch.cuda.empty_cache()
    record = {**environment(), "command": " ".join(["python"] + sys.argv), "block": BLOCK, "rows": rows}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
