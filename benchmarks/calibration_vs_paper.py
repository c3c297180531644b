"""The calibrated policy against the paper's rule on text neither saw: equal accuracy, how much sparsity?

    python benchmarks/calibration_vs_paper.py POLICY.json [--samples 4] [--prompt-len 4096] [--data paul-graham]

POLICY.json is a `tsa-patch calibrate` policy (its report holds the paper's rule measured on the calibration
samples: same drift-selected layers, tau 0.005). Both policies are evaluated on `--samples` test prompts of
`--data` with the continuation protocol (TSA prefill, 64 tokens decoded densely, compared with dense), and the
attention FLOPs each removes is measured on the same prompts (mean over layers of 1 - kept^2). Writes
benchmarks/results/calibration-vs-paper-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tsa_patch.bench import environment
from tsa_patch.calibration.continuation import compare_with_dense, dense_reference
from tsa_patch.calibration.data import load_documents, token_samples
from tsa_patch.kernels.attention import tsa_statistics
from tsa_patch.kernels.policy import ATTENTION_KEY, LayerPolicy, TsaPolicy
from tsa_patch.models import load_model, resolve_model
from tsa_patch.policy import apply_policy_, read_policy


def attention_removed(model, prompts: list[list[int]]) -> float:
    """Mean over prompts and over all layers of 1 - kept^2 (dense layers remove nothing)."""
    total = 0.0
    for ids in prompts:
        with torch.no_grad():
            model(torch.tensor([ids]), logits_to_keep=1)
        stats = tsa_statistics(model)
        total += sum(1 - (s["kept"][0][0] / s["kv_len"]) ** 2 for s in stats if s["path"] == "sparse") / len(stats)
    return total / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("policy")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--data", default="paul-graham")
    args = parser.parse_args()
    calibrated = read_policy(args.policy)
    paper_layers = set(calibrated.calibration["paper_rule"]["layers"])
    paper = TsaPolicy(layers=tuple(LayerPolicy(enabled=i in paper_layers, tau=0.005 if i in paper_layers else 0.0)
                                   for i in range(calibrated.num_layers)),
                      **{k: getattr(calibrated, k) for k in ("window", "pool_kernel", "min_tokens",
                                                             "activation_length", "selection", "dense_backend")})
    model, tokenizer = load_model(resolve_model(calibrated.source_model))
    samples = token_samples(tokenizer, load_documents(args.data), args.samples, args.prompt_len + 64, seed=123)
    reference = dense_reference(model, samples, args.prompt_len)
    rows = {}
    for name, policy in (("paper rule", paper), ("calibrated", calibrated)):
        start = time.time()
        apply_policy_(model, policy)
        metrics = compare_with_dense(model, samples, args.prompt_len, reference, ATTENTION_KEY).as_dict()
        removed = attention_removed(model, [s[: args.prompt_len] for s in samples])
        rows[name] = {"sparse_layers": policy.sparse_layers, "attention_removed": round(removed, 4), **metrics,
                      "seconds": round(time.time() - start, 1)}
        print(name, rows[name], flush=True)
    rows["ratio_attention_removed"] = round(rows["calibrated"]["attention_removed"]
                                            / max(rows["paper rule"]["attention_removed"], 1e-9), 3)
    out = Path("benchmarks/results/calibration-vs-paper-smollm2.json")
    out.write_text(json.dumps({"environment": environment(), "command": "python benchmarks/calibration_vs_paper.py "
                               f"{args.policy} --samples {args.samples} --prompt-len {args.prompt_len} "
                               f"--data {args.data}", "policy": calibrated.to_dict(), "results": rows}, indent=2) + "\n")
    print("calibrated / paper attention removed:", rows["ratio_attention_removed"])


if __name__ == "__main__":
    main()
