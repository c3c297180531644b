"""TSA's scoring (``triton_score.score_keys``) on a GPU: pass 1 alone, both passes, and pass 2's launch shapes.

    python benchmarks/score_tiles_gpu.py --output benchmarks/results/score-tiles-CARD-DATE.json
    PYTHONPATH=.baseline python benchmarks/score_tiles_gpu.py --output ...   # a carried baseline's code, as is

Random bf16 Q/K at Qwen2.5-0.5B attention shapes (14 query / 2 KV heads, d 64) and Llama-3.1-8B's (32 / 8, d 128),
window 128; device time behind a busy GPU (as inside a long prefill), cuDNN dense attention in the same run. Pass 2
is both passes less pass 1. Where the code has pass 2's launch constants (``SCORE_*``), every shape in ``--sweep``
is timed too, with its largest relative difference from the default shape's scores (a sum in another order);
likewise pass 1's (``--sweep-pass1``), both passes timed each time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels import triton_score
from tsa_patch.kernels.dense import causal_attention, sdpa_backend

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
WINDOW = 128
PASS_KNOBS = {"pass2": ("SCORE_WINDOW_BLOCK", "SCORE_TILE", "SCORE_WARPS", "SCORE_PROGRAMS_PER_SM"),
              "pass1": ("WINDOW_BLOCK", "KEY_BLOCK", "STATS_WARPS", "STATS_PROGRAMS_PER_SM")}


def launch_shapes(sweep: str, knobs: tuple[str, ...]) -> list[dict]:
    """A sweep as 'W,W/N,N/warps/programs' (each a comma list) to every combination of one pass's constants."""
    lists = [[int(x) for x in part.split(",")] for part in sweep.split("/")]
    return [dict(zip(knobs, combo)) for combo in itertools.product(*lists)]


def time_scoring(model: str, seq_len: int, shapes: dict[str, list[dict]]) -> dict:
    heads, kv_heads, head_dim = SHAPES[model]
    q = torch.randn(heads, WINDOW, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scaling = head_dim**-0.5

    def both():
        return triton_score.score_keys(q, k, WINDOW, scaling)

    def device_ms(fn) -> float:
        return time_cuda(fn, busy_ahead=True).median_ms

    row = {"model": model, "seq_len": seq_len,
           "pass1_ms": device_ms(lambda: triton_score.window_log2_norms(q, k, scaling))}
    row["score_ms"] = device_ms(both)
    row["pass2_ms"] = row["score_ms"] - row["pass1_ms"]
    q_full = torch.randn(heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    with sdpa_backend("cudnn", q.device):
        row["dense_cudnn_ms"] = device_ms(lambda: causal_attention(q_full, k, v, scaling))
    expected = both()
    for name, pass_shapes in shapes.items():
        if not pass_shapes or not all(hasattr(triton_score, knob) for knob in pass_shapes[0]):
            continue
        default = {knob: getattr(triton_score, knob) for knob in pass_shapes[0]}
        row[f"sweep_{name}"] = []
        for shape in pass_shapes:
            for knob, value in shape.items():
                setattr(triton_score, knob, value)
            try:
                difference = ((both() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
                row[f"sweep_{name}"].append({**shape, "score_ms": device_ms(both),
                                             "max_relative_difference": difference})
            except Exception as error:  # a shape the compiler refuses (registers, shared memory): recorded
                row[f"sweep_{name}"].append({**shape, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            finally:
                for knob, value in default.items():
                    setattr(triton_score, knob, value)
        row[f"default_{name}"] = default
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--sweep", default="64,128/64,128/4,8/1,2,4",
                        help="pass 2's window block / key tile / warps / programs per SM, comma lists ('' for none)")
    parser.add_argument("--sweep-pass1", default="",
                        help="pass 1's window block / key block / warps / programs per SM, comma lists")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    shapes = {name: launch_shapes(sweep, PASS_KNOBS[name]) if sweep else []
              for name, sweep in (("pass2", args.sweep), ("pass1", args.sweep_pass1))}
    rows = []
    for model in args.models.split(","):
        for seq_len in (int(x) for x in args.lengths.split(",")):
            row = time_scoring(model, seq_len, shapes)
            rows.append(row)
            print(f"{model} L={seq_len}: pass 1 {row['pass1_ms']:.4f} ms, pass 2 {row['pass2_ms']:.4f} ms, "
                  f"scoring {row['score_ms']:.4f} ms = {row['score_ms'] / row['dense_cudnn_ms']:.3f} of dense")
            for name in shapes:
                for entry in sorted(row.get(f"sweep_{name}", []), key=lambda e: e.get("score_ms", float("inf")))[:6]:
                    print("    ", name, entry)
    with open(args.output, "w") as f:
        json.dump({**environment(), "command": " ".join(sys.argv), "window": WINDOW, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
