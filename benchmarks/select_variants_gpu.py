"""Time TSA's radix token selection of whichever ``tsa_patch`` is first on ``PYTHONPATH``, to compare copies of it.

    PYTHONPATH=.baseline python benchmarks/select_variants_gpu.py base OUT_DIR
    PYTHONPATH=$PWD python benchmarks/select_variants_gpu.py current OUT_DIR
    python benchmarks/select_variants_gpu.py --compare base current OUT_DIR  # outputs identical, bit for bit?

Shapes: Llama-3.1-8B (32 query heads) and Qwen2.5-0.5B (14), query-head selection, at 8K, 16K and 32K; the pooled
scores drawn heavy-tailed (``rand ** 8``, seeded per case); the coverage rule at tau 0.2 ("paper", min_tokens 1024)
and a count forced to 15 % of the candidates. Device time with the launches hidden (``time_cuda(busy_ahead=True)``),
median. Writes ``sel-NAME.json`` (timings) and ``sel-NAME.pt`` (kept positions and counts) under OUT_DIR.
"""

from __future__ import annotations

import json
import sys

import torch

HEADS, LENGTHS, WINDOW = {"llama": 32, "qwen": 14}, (8192, 16384, 32768), 128


def time_variant(name: str, out_dir: str) -> None:
    from tsa_patch.bench import time_cuda
    from tsa_patch.kernels.triton_select import select_tokens_padded_radix

    rows, outputs = [], {}
    for model, heads in HEADS.items():
        for seq_len in LENGTHS:
            generator = torch.Generator(device="cuda").manual_seed(seq_len + heads)
            pooled = (torch.rand(heads, seq_len - WINDOW, device="cuda", generator=generator) ** 8).contiguous()
            for keep in (None, round(0.15 * (seq_len - WINDOW))):
                def select():
                    return select_tokens_padded_radix(pooled, seq_len, 0.2, 1024, "paper", keep)

                case = f"{model}-{seq_len}-{'rule' if keep is None else 'forced'}"
                kept, count = select()
                outputs[case] = (kept.cpu(), count.cpu())
                rows.append({"variant": name, "case": case, "count": int(count[0]),
                             "device_ms": round(time_cuda(select, busy_ahead=True).median_ms, 4)})
                print(name, case, rows[-1]["device_ms"], rows[-1]["count"], flush=True)
    torch.save(outputs, f"{out_dir}/sel-{name}.pt")
    with open(f"{out_dir}/sel-{name}.json", "w") as f:
        json.dump(rows, f)


def compare(base: str, other: str, out_dir: str) -> None:
    first, second = (torch.load(f"{out_dir}/sel-{name}.pt") for name in (base, other))
    same = all(torch.equal(a, b) for case in first for a, b in zip(first[case], second[case]))
    print(f"{other} identical to {base}: {same}")


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        compare(*sys.argv[2:5])
    else:
        time_variant(*sys.argv[1:3])
