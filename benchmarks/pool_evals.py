"""Pool `tsa-patch eval` reports of one policy run with different seeds, and compare dense and TSA per sample.

    python benchmarks/pool_evals.py --policy tsa+bs=eval-a-seed0.json,eval-a-seed1.json \
        --policy bs-alone=eval-b.json --card "NVIDIA H200" --output results.json

Each policy's reports are pooled sample by sample: mean score of dense and TSA per prompt length, mean attention
FLOPs computed, and the paired comparison (`tsa_patch.evaluate.paired_comparison`). The output keeps every
report in full next to the pooled figures and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from tsa_patch.suite import answer_score
from tsa_patch.evaluate import paired_comparison


def pool(reports: list[dict]) -> dict:
    """Pooled per-length means and the paired comparison over every sample of ``reports``."""
    lengths: dict[int, list[dict]] = {}
    for report in reports:
        for cell, outputs in report["outputs"].items():
            length = int(cell.split("/")[1])
            for output in outputs:
                lengths.setdefault(length, []).append({
                    "dense": answer_score(output["dense"], output["answers"]),
                    "tsa": answer_score(output["tsa"], output["answers"]),
                    "attention_cost": output["attention_cost"]})
    every = [sample for samples in lengths.values() for sample in samples]
    per_length = []
    for length, samples in sorted(lengths.items()):
        count = len(samples)
        per_length.append({"length": length, "samples": count,
                           "dense": sum(s["dense"] for s in samples) / count,
                           "tsa": sum(s["tsa"] for s in samples) / count,
                           "attention_cost": sum(s["attention_cost"] for s in samples) / count})
    return {"per_length": per_length, "paired": paired_comparison([(s["dense"], s["tsa"]) for s in every])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", required=True, help="NAME=report.json[,report.json...]")
    parser.add_argument("--card", required=True, help="the GPU (or CPU) the reports were measured on")
    parser.add_argument("--versions", default="", help="torch / transformers / triton versions of the run")
    parser.add_argument("--command", default="", help="the command that produced the reports")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    result = {"card": args.card, "versions": args.versions, "date": date.today().isoformat(),
              "command": args.command, "policies": {}}
    print("| policy | samples | length | dense | TSA | delta | attention % | paired delta (95% CI) | better / worse |")
    print("|---|---|---|---|---|---|---|---|---|")
    for entry in args.policy:
        name, files = entry.split("=", 1)
        reports = [json.loads(Path(f).read_text()) for f in files.split(",")]
        pooled = pool(reports)
        result["policies"][name] = {**pooled, "reports": reports}
        paired = pooled["paired"]
        low, high = paired["ci95"]
        for row in pooled["per_length"]:
            print(f"| {name} | {row['samples']} | {row['length']} | {100 * row['dense']:.1f} | {100 * row['tsa']:.1f} "
                  f"| {100 * (row['tsa'] - row['dense']):+.1f} | {100 * row['attention_cost']:.1f} "
                  f"| {100 * paired['mean_delta']:+.2f} ({100 * low:+.2f} to {100 * high:+.2f}) "
                  f"| {paired['tsa_better']} / {paired['tsa_worse']} |")
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
