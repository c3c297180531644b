"""Exported TSA checkpoints beyond one GPU: accelerate's device_map and transformers' tensor parallelism.

    python benchmarks/multi_gpu.py make OUT                     # random Llama-3.1-8B-shaped model + TSA export
    python benchmarks/multi_gpu.py device-map OUT/export --lengths 32768,131072
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py tp OUT/export --lengths 32768,131072

Each mode checks correctness against the dense model under the same parallelism (a policy with tau = 0 must
give the dense logits exactly; the sparse policy must run its sparse layers on every GPU and stay finite) and
times prefill, dense SDPA (cuDNN first) against TSA at a stated kept fraction (the paper's operating point;
random weights give diffuse attention, so the fraction is forced). Results are JSON lines on stdout and in
OUT/multi_gpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def make(out: Path) -> None:
    """Save a random Llama-3.1-8B-shaped model (bf16) and export it with half the layers sparse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsa_patch.bench import MODEL_CONFIGS
    from tsa_patch.kernels.policy import TsaPolicy
    from tsa_patch.policy_file import write_policy

    config = LlamaConfig(**MODEL_CONFIGS["llama-3.1-8b"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out / "model")
    layers = config.num_hidden_layers
    policy = TsaPolicy.uniform(layers, 0.005, list(range(layers // 2, layers)), activation_length=4096,
                               source_model=str(out / "model"))
    write_policy(policy, out / "policy.json")
    subprocess.run(["tsa-patch", "export", str(out / "export"), "--policy", str(out / "policy.json"), "--overwrite"],
                   check=True)


def _check_and_time(model, lengths: list[int], mode: str) -> list[dict]:
    """Correctness (tau = 0 equals dense; the sparse layers ran and stayed finite) and prefill timings."""
    from tsa_patch.bench import environment, paper_kept_fraction, time_cuda
    from tsa_patch.kernels.dense import sdpa_backend
    from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY

    device = model.model.embed_tokens.weight.device
    policy = getattr(model.config, CONFIG_KEY)
    dense_policy = {**policy, "layers": [{"enabled": True, "tau": 0.0}] * len(policy["layers"])}
    rows = []

    def forward(impl, **kwargs):
        model.set_attn_implementation(impl)
        with torch.no_grad(), sdpa_backend("auto", device):
            return model(ids, use_cache=False, logits_to_keep=1, **kwargs).logits

    ids = torch.randint(0, model.config.vocab_size, (1, 8192), generator=torch.Generator().manual_seed(0)).to(device)
    dense = forward("sdpa")
    setattr(model.config, CONFIG_KEY, dense_policy)
    tau0 = forward(ATTENTION_KEY)
    setattr(model.config, CONFIG_KEY, policy)
    sparse = forward(ATTENTION_KEY, tsa_keep_fraction=paper_kept_fraction(8192))
    stats = model.tsa_statistics()
    devices = sorted({str(m.weight.device) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows.append({"mode": mode, "check": "correctness", "seq_len": 8192, "devices": devices,
                 "tau0_equals_dense": bool(torch.equal(tau0, dense)),
                 "tau0_max_abs_diff": (tau0.float() - dense.float()).abs().max().item(),
                 "sparse_layers_ran": [s["layer"] for s in stats if s["path"] == "sparse"],
                 "kept_per_head_layer_last": stats[-1]["kept"], "sparse_finite": bool(torch.isfinite(sparse).all()),
                 "environment": environment()})
    for seq_len in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
        fraction = paper_kept_fraction(seq_len)
        dense_ms = time_cuda(lambda: forward("sdpa"), budget_s=0.0, min_runs=2).median_ms
        tsa_ms = time_cuda(lambda: forward(ATTENTION_KEY, tsa_keep_fraction=fraction), budget_s=0.0, min_runs=2).median_ms
        rows.append({"mode": mode, "check": "prefill", "seq_len": seq_len, "kept_fraction": round(fraction, 3),
                     "sparse_layers": len(policy["layers"]) // 2, "dense_ms": round(dense_ms, 1),
                     "tsa_ms": round(tsa_ms, 1), "speedup": round(dense_ms / tsa_ms, 3)})
    return rows


def _emit(rows: list[dict], out: Path) -> None:
    with open(out, "a") as f:
        for row in rows:
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["make", "device-map", "tp"])
    parser.add_argument("path")
    parser.add_argument("--lengths", default="32768,131072")
    args = parser.parse_args()
    path = Path(args.path)
    if args.mode == "make":
        make(path)
        return
    from transformers import AutoModelForCausalLM

    lengths = [int(x) for x in args.lengths.split(",")]
    results = path.parent / "multi_gpu.jsonl"
    if args.mode == "device-map":
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16,
                                                     device_map="auto", max_memory={0: "10GiB", 1: "60GiB"})
        _emit(_check_and_time(model.eval(), lengths, "device_map"), results)
        return
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, tp_plan="auto")
    rows = _check_and_time(model.eval(), lengths, "tensor_parallel")
    if rank == 0:
        _emit(rows, results)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.exit(0)


if __name__ == "__main__":
    main()
