"""Launch shapes of TSA's token selection on a CUDA GPU: candidates per serial step (``triton_select.BLOCK``) and
warps per program (``SORTED_WARPS``, ``RADIX_WARPS``) for both implementations, at the lengths a sparse layer runs.

    python benchmarks/select_shape_gpu.py --output benchmarks/results/select-shape-CARD-DATE.json
    python benchmarks/select_shape_gpu.py --digits --output ...  # the radix search's digit bits a pass
                                                  # (COUNT_BITS, MASS_BITS) instead, the sorts at their default

One program per selecting head walks the whole row several times (the count's tail, the cut, the ordered
write-out), so its time is the latency of those serial steps: fewer, wider steps should cut it. Shapes: Qwen2.5-0.5B
(14 query heads) and Llama-3.1-8B (32), query-head selection; the pooled scores drawn heavy-tailed (``rand ** 8``);
the count set by the coverage rule at tau 0.2 (what the real Qwen's sparse layers use, 0.05-0.2) and forced to 15 %
of the candidates (what they keep at 32K). Every shape's kept positions and counts must equal the default shape's
(bit for bit); device time with the launches hidden (``time_cuda(busy_ahead=True)``), median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels import triton_select

HEADS = {"qwen2.5-0.5b": 14, "llama-3.1-8b": 32}
WINDOW = 128
BLOCKS, WARPS = (1024, 2048, 4096, 8192), (4, 8, 16)
SWEPT_COUNT_BITS, SWEPT_MASS_BITS = (2, 4, 8), (1, 2, 4)  # 8 bits of mass: 256 sums a value (it did not finish)
PATHS = {"radix": (triton_select.select_tokens_padded_radix, "RADIX_WARPS"),
         "sorted": (triton_select.select_tokens_padded_sorted, "SORTED_WARPS")}


def run(select, constants: dict, pooled, seq_len: int, keep: int | None):
    """The selection with the module's ``constants`` set for the call, then restored."""
    saved = {name: getattr(triton_select, name) for name in constants}
    for name, value in constants.items():
        setattr(triton_select, name, value)
    try:
        return select(pooled, seq_len, 0.2, 1024, "paper", keep)
    finally:
        for name, value in saved.items():
            setattr(triton_select, name, value)


def shapes(path: str, warps_name: str, forced: bool, digits: bool) -> list[dict]:
    """The constants to sweep: launch shapes, or with ``digits`` the radix search's bits a pass (a forced count
    runs no coverage rule: its MASS_BITS stays; the sorts only at their default, for reference)."""
    if not digits:
        return [{"BLOCK": block, warps_name: warps} for block, warps in itertools.product(BLOCKS, WARPS)]
    if path == "sorted":
        return [{"BLOCK": triton_select.BLOCK}]
    mass = (triton_select.MASS_BITS,) if forced else SWEPT_MASS_BITS
    return [{"COUNT_BITS": count, "MASS_BITS": m} for count, m in itertools.product(SWEPT_COUNT_BITS, mass)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,12288,16384,24576,32768")
    parser.add_argument("--output", required=True)
    parser.add_argument("--digits", action="store_true", help="sweep the radix search's digit bits, not the shapes")
    args = parser.parse_args()
    rows = []
    for (model, heads), seq_len in itertools.product(HEADS.items(), map(int, args.lengths.split(","))):
        generator = torch.Generator(device="cuda").manual_seed(seq_len + heads)
        pooled = torch.rand(heads, seq_len - WINDOW, device="cuda", generator=generator) ** 8
        forced = round(0.15 * (seq_len - WINDOW))
        for (path, (select, warps_name)), keep in itertools.product(PATHS.items(), (None, forced)):
            sweep = shapes(path, warps_name, keep is not None, args.digits)
            default = {name: getattr(triton_select, name) for name in sweep[0]}
            reference = run(select, default, pooled, seq_len, keep)
            for constants in sweep:
                row = {"model": model, "seq_len": seq_len, "path": path, "count": "rule tau 0.2" if keep is None
                       else "forced 0.15", **constants, "default": constants == default}
                try:
                    kept, count = run(select, constants, pooled, seq_len, keep)
                    row["equal_to_default"] = bool(torch.equal(kept, reference[0]) and torch.equal(count, reference[1]))
                    row["device_ms"] = round(time_cuda(lambda: run(select, constants, pooled, seq_len, keep),
                                                       busy_ahead=True, budget_s=0.2).median_ms, 4)
                except Exception as err:  # noqa: BLE001 - a shape that does not compile is recorded, not fatal
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    record = {**environment(), "command": " ".join(["python"] + sys.argv), "rows": rows}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print("model          length  path    count         default ms  best ms (constants)  all equal")
    for key, group in itertools.groupby(rows, key=lambda r: (r["model"], r["seq_len"], r["path"], r["count"])):
        group = [r for r in group if "device_ms" in r]
        default = next(r for r in group if r["default"])
        best = min(group, key=lambda r: r["device_ms"])
        swept = [name for name in best if name.isupper()]
        print(f"{key[0]:14} {key[1]:6}  {key[2]:6}  {key[3]:12}  {default['device_ms']:10.4f}  "
              f"{best['device_ms']:7.4f} ({'/'.join(str(best[name]) for name in swept)})  "
              f"{all(r['equal_to_default'] for r in group)}")


if __name__ == "__main__":
    main()
