"""Registers a thread of the block-sparse kernel takes on an H100, compiled on any machine (no GPU needed).

    python benchmarks/kernel_registers.py [--arch 90] [--output benchmarks/results/kernel-registers-DATE.json]

Triton compiles ``triton_block._block_sparse_kernel`` for the target at its default launch shape (bf16, blocks of
128) for both loaders at head dims 64 and 128, with the argument specialisations a real launch gets (16-byte aligned
pointers, strides and length divisible by 16); the ptxas that ships with Triton reports registers and spills. An SM
has 65,536 registers, so a kernel of 8 warps fits two programs per SM only at 128 registers a thread or fewer: the
register count decides occupancy before the GPU runs anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tsa_patch.bench import environment
from tsa_patch.kernels import triton_block

REGISTERS_PER_SM = 65536


def compile_kernel(head_dim: int, descriptors: bool, arch: int) -> dict:
    """Compile the kernel for ``sm_{arch}`` at ``default_tiling``'s shape; ptxas's registers and spills."""
    fn = triton_block._block_sparse_kernel
    tiling = triton_block.default_tiling(128, head_dim, torch.bfloat16)
    constants = {"BLOCK": 128, "BLOCK_N": tiling.block_n, "BLOCK_D": head_dim, "HEAD_DIM": head_dim,
                 "DESCRIPTORS": descriptors, "PRECISION": "tf32"}
    signature, aligned = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name in ("K", "V") and descriptors:
            signature[name] = f"tensordesc<bf16[1,{tiling.block_n},{head_dim}]>"
            continue
        signature[name] = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Index": "*i32",
                           "Count": "*i32", "scale_log2": "fp32"}.get(name, "i32")
        if signature[name].startswith("*") or name.startswith("stride") or name == "seq_len":
            aligned.append(i)
    source = ASTSource(fn=fn, signature=signature, attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": tiling.num_warps, "num_stages": tiling.num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch == 90 else ""  # sm_90a: Hopper's wgmma and TMA instructions
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    threads = tiling.num_warps * 32
    return {"head_dim": head_dim, "descriptors": descriptors, "tiling": tiling._asdict(), "registers": registers,
            "spill_store_bytes": spills, "programs_per_sm_by_registers": REGISTERS_PER_SM // (registers * threads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--output")
    args = parser.parse_args()
    rows = [compile_kernel(d, desc, args.arch) for d in (64, 128) for desc in ((False, True) if args.arch >= 90
                                                                              else (False,))]
    for row in rows:
        print(f"head dim {row['head_dim']:3}  {'descriptors' if row['descriptors'] else 'pointers   '}  "
              f"{row['registers']} registers, {row['spill_store_bytes']} B spilled, "
              f"{row['programs_per_sm_by_registers']} programs per SM")
    if args.output:
        record = {**environment(), "command": " ".join(["python"] + sys.argv), "code": triton_block.__file__,
                  "arch": args.arch, "rows": rows}
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
