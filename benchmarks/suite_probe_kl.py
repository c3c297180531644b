"""Does a KL measured on the suite's own prompts see the answers TSA flips? For each policy and each prompt of a
``tsa-patch eval`` report: prefill the prompt with TSA, run the dense model's answer (its greedy output in the
report) densely over that cache, as calibration's probes do, and take the mean KL(dense || TSA) over the answer's
tokens. Then compare that KL with what the suite scored: on the prompts whose TSA score differs from dense, and
between policies (does the policy that lost more answers measure a higher KL?).

    python benchmarks/suite_probe_kl.py --model SmolLM2-135M-Instruct --lengths 1024,2048 --samples 6 \
        --policy one-step=POLICY.json=EVAL.json --policy search=POLICY2.json=EVAL2.json --output out.json

The lengths, samples and seed must be those of the eval reports (their prompts are rebuilt from them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from tsa_patch.bench import environment
from tsa_patch.calibration.continuation import dense_implementation, position_kl, prefill_then_continue
from tsa_patch.evaluate import EvalConfig, suite_samples
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY
from tsa_patch.models import load_model, resolve_model


def answer_logprobs(model, prompts: list[tuple[list[int], list[int]]], implementation: str) -> list[torch.Tensor]:
    """Log-probabilities (La, V) of each answer's tokens: the prompt prefilled with ``implementation``, the answer
    run densely over its cache."""
    dense_impl = dense_implementation(model)
    return [prefill_then_continue(model, torch.tensor([prompt]), torch.tensor([answer]), implementation, dense_impl)
            for prompt, answer in prompts]


def auc(positive: list[float], negative: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    if not positive or not negative:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--lengths", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", action="append", required=True, help="NAME=POLICY_JSON=EVAL_REPORT_JSON")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    model, tokenizer = load_model(resolve_model(args.model), device="cpu")
    config = EvalConfig(lengths=tuple(int(n) for n in args.lengths.split(",")), samples=args.samples, seed=args.seed)
    samples = suite_samples(tokenizer, config)
    runs = {}
    for spec in args.policy:
        name, policy_file, report_file = spec.split("=")
        runs[name] = (json.loads(Path(policy_file).read_text()), json.loads(Path(report_file).read_text()))
    first_report = next(iter(runs.values()))[1]
    cells, prompts = [], []
    for (task, length), items in samples.items():
        outputs = first_report["outputs"][f"{task}/{length}"]
        for (sample, ids), output in zip(items, outputs):
            answer = tokenizer(output["dense"], add_special_tokens=False).input_ids[: sample.max_new_tokens]
            cells.append((task, length, output["index"]))
            prompts.append((ids, answer or [tokenizer.eos_token_id]))
    dense = answer_logprobs(model, prompts, dense_implementation(model))
    result = {}
    for name, (policy, report) in runs.items():
        setattr(model.config, CONFIG_KEY, policy)
        model.set_attn_implementation(ATTENTION_KEY)
        kls = [position_kl(d, t).mean().item() for d, t in zip(dense, answer_logprobs(model, prompts, ATTENTION_KEY))]
        changed, unchanged, rows = [], [], []
        for (task, length, index), kl in zip(cells, kls):
            output = report["outputs"][f"{task}/{length}"][index]
            moved = output["tsa_score"] != output["dense_score"]
            (changed if moved else unchanged).append(kl)
            rows.append({"task": task, "length": length, "index": index, "answer_kl": kl,
                         "dense_score": output["dense_score"], "tsa_score": output["tsa_score"]})
        result[name] = {"mean_answer_kl": statistics.fmean(kls), "median_answer_kl": statistics.median(kls),
                        "prompts_changed": len(changed),
                        "mean_kl_changed": statistics.fmean(changed) if changed else None,
                        "mean_kl_unchanged": statistics.fmean(unchanged), "auc_changed": auc(changed, unchanged),
                        "prompts": rows}
        print(name, json.dumps({k: v for k, v in result[name].items() if k != "prompts"}), flush=True)
    record = {**environment(), "command": " ".join(["python"] + sys.argv), "model": args.model, "policies": result}
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
