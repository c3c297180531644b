"""Accuracy of the two GQA selection modes (query_head vs kv_group) on the real SmolLM2-135M-Instruct, CPU.

    python benchmarks/accuracy_selection.py [--samples 4] [--prompt-len 4096] [--continuation 64]

Same policy for both (the paper's rule: drift-selected half of the layers, tau = 0.005, calibrated on
Shakespeare), evaluated on Paul Graham essays with the continuation protocol of
tsa_patch.calibration.continuation. Writes benchmarks/results/accuracy-selection-smollm2.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from tsa_patch.bench import environment
from tsa_patch.calibrate import CalibrationConfig, calibrate
from tsa_patch.calibration.continuation import continuation_metrics
from tsa_patch.data import DEFAULT_EVALUATION_DATA, load_documents, token_samples
from tsa_patch.kernels.attention import attention_summary, tsa_statistics
from tsa_patch.kernels.policy import ATTENTION_KEY
from tsa_patch.models import load_model, resolve_model
from tsa_patch.models import apply_policy_


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = resolve_model(None)
    model, tokenizer = load_model(source)
    policy = calibrate(model, tokenizer, CalibrationConfig(method="drift"), source_model=source.spec).policy
    samples = token_samples(tokenizer, load_documents(DEFAULT_EVALUATION_DATA), args.samples,
                            args.prompt_len + args.continuation, seed=1)
    rows = []
    for selection in ("query_head", "kv_group"):
        apply_policy_(model, dataclasses.replace(policy, selection=selection))
        start = time.time()
        metrics = continuation_metrics(model, samples, args.prompt_len, sparse_impl=ATTENTION_KEY)
        with torch.no_grad():
            model(torch.tensor([samples[0][: args.prompt_len]]), logits_to_keep=1)
        kept = attention_summary(tsa_statistics(model))["kept_fraction"]
        rows.append({"selection": selection, **metrics.as_dict(), "kept_fraction_sample0": round(kept, 4),
                     "seconds": round(time.time() - start, 1)})
        print(rows[-1], flush=True)
    out = Path("benchmarks/results/accuracy-selection-smollm2.json")
    out.write_text(json.dumps({"environment": environment(), "command": "python benchmarks/accuracy_selection.py "
                               f"--samples {args.samples} --prompt-len {args.prompt_len} --continuation {args.continuation}",
                               "policy": policy.to_dict(), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
