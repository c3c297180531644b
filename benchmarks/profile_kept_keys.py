"""Where a kept-keys sparse layer (``rows="all"``, the real-model default) spends its device time, stage by stage.

    python benchmarks/profile_kept_keys.py --output benchmarks/results/profile-kept-keys-CARD-DATE.json

Random bf16 Q/K/V at Qwen2.5-0.5B attention shapes (14 query / 2 KV heads, d 64) and Llama-3.1-8B's (32 / 8, d 128).
The pooled scores that the selection reads are drawn heavy-tailed (``rand ** 8``), and coverage runs its tau path
(0.2; averaged over heads these scores keep about 61 % of the candidates); ``--keep-fraction`` forces the count
instead (the real Qwen's sparse layers keep 4-24 % at 32K). Each stage runs on the previous stage's real outputs,
timed behind a busy GPU (device time, as inside a long prefill); the whole layer as the runtime chains it; cuDNN
dense in the same run; and a torch.profiler table of the whole layer's kernels.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.reference import kept_keys_cost
from tsa_patch.kernels.triton_kept_keys import HALF_TILING, prepare_kept_keys
from tsa_patch.kernels.tsa import STAGES, sparse_attention_kept_keys, token_scores

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama-3.1-8b": (32, 8, 128)}
OPTIONS = dict(window=128, pool_kernel=7, min_tokens=1024, local_keys=128, tau=0.2)


def profile_layer(model: str, seq_len: int, table_rows: int, keep_fraction: float | None) -> dict:
    heads, kv_heads, head_dim = SHAPES[model]
    q = torch.randn(heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scaling = head_dim**-0.5
    stages = STAGES["triton"]
    window, tau, local = OPTIONS["window"], OPTIONS["tau"], OPTIONS["local_keys"]
    scores = stages.score(q, k, window, scaling, None)
    pooled = (torch.rand(heads, seq_len - window, device="cuda") ** 8).contiguous()  # heavy-tailed
    keep = None if keep_fraction is None else round(keep_fraction * (seq_len - window))
    kept, count = stages.select(pooled, seq_len, tau, OPTIONS["min_tokens"], "paper", keep)

    def layer():
        token_scores(q, k, window=window, pool_kernel=OPTIONS["pool_kernel"], selection="query_head",
                     scaling=scaling, backend="triton")  # its pooled scores are near-uniform: not used below
        result = sparse_attention_kept_keys(q, k, v, pooled, tau=tau, min_tokens=OPTIONS["min_tokens"],
                                            scaling=scaling, keep_fraction=keep_fraction, local_keys=local)
        if len(result) == 3:  # a baseline from before the input step wrote the cost: the runtime's torch ops did
            return result[0], kept_keys_cost(result[1], result[2], seq_len, local)
        return result[0], result[3]

    timed = {
        "score": lambda: stages.score(q, k, window, scaling, None),
        "smooth": lambda: stages.smooth(scores[:, : seq_len - window].contiguous(), OPTIONS["pool_kernel"]),
        "select": lambda: stages.select(pooled, seq_len, tau, OPTIONS["min_tokens"], "paper", keep),
        # the kernel's inputs in one launch (since the eighth session of 2026-12-06 also the query blocks' bounds
        # and the cost statistic, which a baseline computes by torch ops: in kept_keys_attention and "cost")
        "prepare": lambda: prepare_kept_keys(k, v, kept, count, seq_len, local, HALF_TILING.block_n),
        "kept_keys_attention": lambda: stages.kept_keys(q, k, v, kept, count, scaling, local_keys=local),
        "cost": lambda: kept_keys_cost(kept, count, seq_len, local),
        "layer": layer,
    }
    row = {"model": model, "seq_len": seq_len, "tau": tau, "forced_keep_fraction": keep_fraction, "local_keys": local,
           "kept_fraction": (count.float().mean() / seq_len).item(),
           "attention_cost": kept_keys_cost(kept, count, seq_len, local).item()}
    row["device_ms"] = {name: time_cuda(fn, busy_ahead=True).median_ms for name, fn in timed.items()}
    row["alone_ms"] = {"layer": time_cuda(layer).median_ms}
    with sdpa_backend("cudnn", q.device):
        def attend_dense():
            return causal_attention(q, k, v, scaling)

        row["device_ms"]["dense_cudnn"] = time_cuda(attend_dense, busy_ahead=True).median_ms
        row["alone_ms"]["dense_cudnn"] = time_cuda(attend_dense).median_ms
    dense = row["device_ms"]["dense_cudnn"]
    row["layer_over_dense"] = row["device_ms"]["layer"] / dense
    row["stages_over_dense"] = {name: ms / dense for name, ms in row["device_ms"].items()}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer()
        torch.cuda.synchronize()
    kernels = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    row["kernels"] = [{"name": e.key[:90], "calls_per_layer": e.count / 5,
                       "device_us_per_layer": e.device_time_total / 5}
                      for e in kernels if e.device_time_total > 0][:table_rows]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--table-rows", type=int, default=14)
    parser.add_argument("--keep-fraction", type=float, help="force each head's count to this share of candidates")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for seq_len in (int(x) for x in args.lengths.split(",")):
            row = profile_layer(model, seq_len, args.table_rows, args.keep_fraction)
            rows.append(row)
            print(f"{model} L={seq_len} kept {row['kept_fraction']:.3f} cost {row['attention_cost']:.3f}: layer "
                  f"{row['layer_over_dense']:.3f} of dense ({stage_line(row)})")
            for kernel in row["kernels"]:
                print(f"    {kernel['device_us_per_layer']:8.1f} us  x{kernel['calls_per_layer']:.0f}  "
                      f"{kernel['name']}")
    result = {**environment(), "command": " ".join(sys.argv), "options": OPTIONS, "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


def stage_line(row: dict) -> str:
    return ", ".join(f"{name} {ms:.3f} ms" for name, ms in row["device_ms"].items())


if __name__ == "__main__":
    main()
