"""CPU cost of an export's forward when every layer runs dense (prompt below the activation length), against the
same checkpoint with attn_implementation="sdpa" under cuDNN: cProfile of N prefills each, the functions whose own
time differs most.

    python benchmarks/profile_dense_path.py EXPORT_DIR [--length 1024] [--runs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from tsa_patch.bench import time_cuda
from tsa_patch.kernels.dense import sdpa_backend
from tsa_patch.kernels.policy import ATTENTION_KEY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 1000, (1, args.length), device="cuda")

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)

    variants = {  # name: (attention implementation, SDPA order set around the timing loop, or None)
        "sdpa+cudnn": ("sdpa", "cudnn"), "sdpa+auto-order": ("sdpa", "auto"), "sdpa default": ("sdpa", None),
        "export": (ATTENTION_KEY, None), "export in auto-order context": (ATTENTION_KEY, "auto")}
    times = {name: [] for name in variants}
    for _round in range(7):  # unprofiled, interleaved
        for name, (implementation, order) in variants.items():
            model.set_attn_implementation(implementation)
            with sdpa_backend(order, torch.device("cuda")) if order else contextlib.nullcontext():
                times[name].append(time_cuda(prefill, budget_s=0.3).median_ms)
    base = statistics.median(times["sdpa+cudnn"])
    for name, values in times.items():
        print(f"L={args.length} {name}: {statistics.median(values):.2f} ms, sdpa+cudnn / this {base / statistics.median(values):.3f}")
    if args.runs == 0:
        return
    own = {}
    for name, implementation in (("sdpa", "sdpa"), ("tsa", ATTENTION_KEY)) * 2:
        model.set_attn_implementation(implementation)
        with sdpa_backend("cudnn", torch.device("cuda")) if name == "sdpa" else sdpa_backend("auto", torch.device("cpu")):
            for _ in range(5):
                prefill()
            torch.cuda.synchronize()
            profile = cProfile.Profile()
            begin = time.perf_counter()
            profile.enable()
            for _ in range(args.runs):
                prefill()
            torch.cuda.synchronize()
            profile.disable()
            print(name, f"{(time.perf_counter() - begin) / args.runs * 1000:.2f} ms per prefill (profiled)")
        stats = pstats.Stats(profile).stats
        own[name] = {f"{k[0].split('/')[-1]}:{k[1]}({k[2]})": (v[2] / args.runs * 1e6, v[1] / args.runs)
                     for k, v in stats.items()}
    keys = set(own["sdpa"]) | set(own["tsa"])
    diff = sorted(keys, key=lambda k: own["tsa"].get(k, (0, 0))[0] - own["sdpa"].get(k, (0, 0))[0], reverse=True)
    print("own time per prefill, us (tsa - sdpa), calls per prefill")
    for k in diff[:25]:
        t, s = own["tsa"].get(k, (0, 0)), own["sdpa"].get(k, (0, 0))
        print(f"{t[0] - s[0]:9.1f}  tsa {t[0]:8.1f} ({t[1]:5.0f})  sdpa {s[0]:8.1f} ({s[1]:5.0f})  {k}")


if __name__ == "__main__":
    main()
