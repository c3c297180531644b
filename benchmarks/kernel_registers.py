"""Registers a thread of the block-sparse kernel (or the scoring kernels) takes on an H100, compiled on any
machine (no GPU needed).

    python benchmarks/kernel_registers.py [--arch 90] [--kernel block|score] [--output benchmarks/results/...json]

Triton compiles ``triton_block._block_sparse_kernel`` for the target at its default launch shape (bf16, blocks of
128) for both loaders at head dims 64 and 128, with the argument specialisations a real launch gets (16-byte aligned
pointers, strides and length divisible by 16); the ptxas that ships with Triton reports registers and spills. An SM
has 65,536 registers, so a kernel of 8 warps fits two programs per SM only at 128 registers a thread or fewer: the
register count decides occupancy before the GPU runs anything. ``--kernel score`` compiles TSA's two scoring passes
(``triton_score``, bf16, their launch shapes) and also counts their machine instructions by opcode (nvdisasm):
what a change to their per-logit arithmetic removes, before a GPU times it. ``PYTHONPATH=.baseline`` compiles a
carried baseline's kernels instead.
"""

from __future__ import annotations

import argparse
import collections
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
from tsa_patch.kernels import triton_block, triton_score

REGISTERS_PER_SM = 65536


def compile_report(fn, constants: dict, types: dict, num_warps: int, num_stages: int, arch: int) -> dict:
    """Compile ``fn`` for ``sm_{arch}`` (``types``: the non-constexpr arguments' types, i32 by default); ptxas's
    registers and spills, and the machine code's instruction count by opcode."""
    signature, aligned = {}, []
    for i, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in constants else types.get(name, "i32")
        if signature[name].startswith("*") or name.startswith("stride") or name == "seq_len":
            aligned.append(i)
    source = ASTSource(fn=fn, signature=signature, attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    suffix = "a" if arch == 90 else ""  # sm_90a: Hopper's wgmma and TMA instructions
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([os.path.join(tools, "ptxas"), f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    opcodes = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(
        r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M))
    return {"registers": registers, "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
            "programs_per_sm_by_registers": REGISTERS_PER_SM // (registers * num_warps * 32),
            "instructions": sum(opcodes.values()), "opcodes": dict(opcodes.most_common())}


def compile_kernel(head_dim: int, descriptors: bool, arch: int) -> dict:
    """The block-sparse kernel at ``default_tiling``'s shape."""
    tiling = triton_block.default_tiling(128, head_dim, torch.bfloat16)
    constants = {"BLOCK": 128, "BLOCK_N": tiling.block_n, "BLOCK_D": head_dim, "HEAD_DIM": head_dim,
                 "DESCRIPTORS": descriptors, "PRECISION": "tf32"}
    types = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Index": "*i32", "Count": "*i32",
             "scale_log2": "fp32"}
    if descriptors:
        types["K"] = types["V"] = f"tensordesc<bf16[1,{tiling.block_n},{head_dim}]>"
    report = compile_report(triton_block._block_sparse_kernel, constants, types, tiling.num_warps,
                            tiling.num_stages, arch)
    return {"kernel": "block_sparse", "head_dim": head_dim, "descriptors": descriptors, "tiling": tiling._asdict(),
            **report}


def compile_scoring(head_dim: int, arch: int) -> list[dict]:
    """TSA's scoring passes at their launch shapes (``window_log2_norms`` and ``score_keys``)."""
    common = {"BLOCK_D": head_dim, "HEAD_DIM": head_dim, "PRECISION": "tf32", "SOFTCAP": 0.0}
    types = {name: "*fp32" for name in ("M", "L", "InvL", "Log2Norm", "Out")}
    types.update(Q="*bf16", K="*bf16", scaling="fp32", inv_window="fp32")
    ts = triton_score
    passes = [(ts._window_stats_kernel, {"BLOCK_W": ts.WINDOW_BLOCK, "BLOCK_N": ts.KEY_BLOCK}, ts.STATS_WARPS, 3),
              (ts._key_scores_kernel, {"BLOCK_W": ts.SCORE_WINDOW_BLOCK, "BLOCK_N": ts.SCORE_TILE}, ts.SCORE_WARPS, 3)]
    return [{"kernel": fn.__name__, "head_dim": head_dim, "num_warps": warps,
             **compile_report(fn, {**common, **shape}, types, warps, stages, arch)}
            for fn, shape, warps, stages in passes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--kernel", choices=("block", "score"), default="block")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.kernel == "score":
        rows = [row for d in (64, 128) for row in compile_scoring(d, args.arch)]
    else:
        rows = [compile_kernel(d, desc, args.arch) for d in (64, 128) for desc in ((False, True) if args.arch >= 90
                                                                                  else (False,))]
    for row in rows:
        name = row["kernel"] if args.kernel == "score" else "descriptors" if row["descriptors"] else "pointers"
        top = ", ".join(f"{op} {n}" for op, n in list(row["opcodes"].items())[:8])
        print(f"head dim {row['head_dim']:3}  {name:21}  {row['registers']} registers, {row['spill_store_bytes']} B "
              f"spilled, {row['programs_per_sm_by_registers']} programs per SM; {row['instructions']} instructions "
              f"({top})")
    if args.output:
        code = (triton_score if args.kernel == "score" else triton_block).__file__
        record = {**environment(), "command": " ".join(["python"] + sys.argv), "code": code,
                  "arch": args.arch, "rows": rows}
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
