"""Calibration at a real model size on one GPU: time and peak memory of ``calibrate`` on a Llama-3.1-8B-shaped
model (random bf16 weights, ``--layers`` decoder layers) at long context.

Random weights make the chosen policy meaningless; what this measures is the cost: every layer at every tau on
the calibration samples, the end-to-end search, and the held-out check, with one layer's activations at a time.

    python benchmarks/calibrate_gpu.py --tokenizer DIR --data FILE.txt [--layers 8] [--seq-len 32768]

Writes a JSON (card, versions, date, command, wall time, peak memory, the report's summary) to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tsa_patch.bench import environment
from tsa_patch.calibrate import CalibrationConfig, calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (its vocabulary sizes the model)")
    parser.add_argument("--data", required=True, help="calibration text (.txt)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--holdout", type=int, default=1)
    parser.add_argument("--output", default="calibration-gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=len(tokenizer),
                         max_position_embeddings=131072, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    cuda = args.device == "cuda"
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32).eval()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    phases = []

    def progress(description: str, total: int):
        """Record, per step of the calibration, the memory in use and the peak so far."""
        def unit():
            if cuda:
                phases.append({"step": description, "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        unit()
        return unit

    result = calibrate(model, tokenizer, CalibrationConfig(data=args.data, samples=args.samples, holdout=args.holdout,
                                                           seq_len=args.seq_len), progress=progress)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    report = result.report
    record = {
        **environment(), "command": " ".join(["python"] + sys.argv),
        "model": f"Llama-3.1-8B shapes, {args.layers} layers, random bf16 weights, vocabulary {len(tokenizer)}",
        "seq_len": args.seq_len, "samples": args.samples, "holdout": args.holdout,
        "wall_seconds": round(wall, 1), "weights_gib": round(weights / 2**30, 2),
        "peak_gib": round(peak / 2**30, 2), "peak_beyond_weights_gib": round((peak - weights) / 2**30, 2),
        "end_to_end_evaluations": len(report["evaluations"]) + len(report["held_out_evaluations"]) + 2,
        "chosen": report["chosen"], "memory_by_step": phases, "paper_rule_attention_removed": report["paper_rule"]["attention_removed"],
    }
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k not in ("chosen", "memory_by_step")}, indent=1))
    for phase in phases:
        print(phase)


if __name__ == "__main__":
    main()
