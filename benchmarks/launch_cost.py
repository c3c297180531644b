"""Host and device cost of a sparse layer's pieces at Llama-3.1-8B shapes (32/8 heads, d 128, bf16, the paper's
kept fraction): the Triton token selection's two implementations (the radix search and the sorts, between which
``triton_select.select_tokens_padded`` chooses by length) against its PyTorch twin, the other stages, and whole
layers.

For each piece: CPU microseconds per call with the GPU left to run behind (up to 200 calls, one sync at the end:
the host cost when launches are the bottleneck), the CUDA-event time of a call alone, and its device time with the
launches hidden (``time_cuda(busy_ahead=True)``). Dense cuDNN of the same length is timed in the same run.

    python benchmarks/launch_cost.py [--lengths 4096,8192,32768,131072] [--out launch-cost.json] [--only PIECES]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tsa_patch.bench import environment, paper_kept_fraction, time_cuda
from tsa_patch.kernels.dense import dense_attention
from tsa_patch.kernels.reference import query_rows, select_tokens_padded_ref
from tsa_patch.kernels.triton_select import select_tokens_padded_radix, select_tokens_padded_sorted
from tsa_patch.kernels.tsa import STAGES, token_scores, tsa_attention, tsa_attention_sync_free

HEADS, KV_HEADS, DIM, WINDOW, POOL = 32, 8, 128, 128, 13
SCALE = DIM**-0.5


def host_us(fn, budget_s: float = 0.5, max_calls: int = 200) -> float:
    """CPU microseconds per call, the GPU running behind (a call that syncs pays its wait here too); as many calls
    as fit in about ``budget_s`` of GPU time (at least 5, at most ``max_calls``), so that 128K stays short."""
    fn()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(5, min(max_calls, int(budget_s / (time.perf_counter() - begin))))
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - begin
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def measure(length: int, only: list[str]) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(length)
    q = torch.randn(HEADS, length, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
    k, v = (torch.randn(KV_HEADS, length, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
            for _ in range(2))
    fraction = paper_kept_fraction(length)
    stages = STAGES["triton"]
    options = dict(tau=0.005, window=WINDOW, pool_kernel=POOL, min_tokens=1024, selection="query_head",
                   scaling=SCALE, keep_fraction=fraction, backend="triton")
    pooled = token_scores(q, k, window=WINDOW, pool_kernel=POOL, selection="query_head", scaling=SCALE,
                          backend="triton")
    keep = round(fraction * pooled.shape[1])
    kept, count = stages.select(pooled, length, 0.005, 1024, "paper", keep)
    kept = kept[:, : int(count[0])]
    rows = query_rows(kept, HEADS, length, length)
    q_c, k_c, v_c = stages.compress(q, k, v, kept, rows)
    out_c = dense_attention(q_c, k_c, v_c, SCALE)
    pieces = {
        "dense_cudnn": lambda: dense_attention(q, k, v, SCALE),  # the runtime's dense kernel: cuDNN first
        "score_and_smooth": lambda: token_scores(q, k, window=WINDOW, pool_kernel=POOL, selection="query_head",
                                                 scaling=SCALE, backend="triton"),
        "select_triton": lambda: stages.select(pooled, length, 0.005, 1024, "paper", keep),  # the dispatch
        "select_radix": lambda: select_tokens_padded_radix(pooled, length, 0.005, 1024, "paper", keep),
        "select_sorted": lambda: select_tokens_padded_sorted(pooled, length, 0.005, 1024, "paper", keep),
        # the same with the coverage rule deciding the count (a real model's case; random scores keep most tokens)
        "select_radix_rule": lambda: select_tokens_padded_radix(pooled, length, 0.005, 1024, "paper", None),
        "select_sorted_rule": lambda: select_tokens_padded_sorted(pooled, length, 0.005, 1024, "paper", None),
        "select_torch": lambda: select_tokens_padded_ref(pooled, length, 0.005, 1024, "paper", keep),
        "select_triton_read_back": lambda: int(stages.select(pooled, length, 0.005, 1024, "paper", keep)[1][0]),
        "select_torch_read_back": lambda: int(select_tokens_padded_ref(pooled, length, 0.005, 1024, "paper",
                                                                       keep)[1][0]),
        "compress": lambda: stages.compress(q, k, v, kept, rows),
        "attend_compact": lambda: dense_attention(q_c, k_c, v_c, SCALE),
        "decompress": lambda: stages.decompress(out_c, rows, length),
        "layer_synced": lambda: tsa_attention(q, k, v, **options),
        "layer_sync_free": lambda: tsa_attention_sync_free(q, k, v, **options),
    }
    row = {"length": length, "kept_fraction": fraction, "kept_tokens": kept.shape[1]}
    for name, fn in pieces.items():
        if only and name not in only and name != "dense_cudnn":
            continue
        row[name] = {"host_us": host_us(fn), "alone_ms": time_cuda(fn).median_ms,
                     "device_ms": time_cuda(fn, busy_ahead=True).median_ms}
    dense = row["dense_cudnn"]["alone_ms"]
    for name in ("layer_synced", "layer_sync_free"):
        if name in row:
            row[name]["speedup_vs_dense"] = dense / row[name]["alone_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,32768,131072")
    parser.add_argument("--out", default="launch-cost.json")
    parser.add_argument("--only", default="", help="comma-separated pieces to time (dense is always timed)")
    args = parser.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows.append(measure(length, [name for name in args.only.split(",") if name]))
        r = rows[-1]
        print(f"L={length}: " + ", ".join(f"{name} {r[name]['host_us']:.0f} us / {r[name]['alone_ms']:.3f} ms / "
                                          f"{r[name]['device_ms']:.3f} ms" for name in r if isinstance(r[name], dict)),
              flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"environment": environment(), "command": "python benchmarks/launch_cost.py --lengths "
                   + args.lengths + (f" --only {args.only}" if args.only else ""), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
