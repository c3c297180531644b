"""Block-sparse attention on a CUDA GPU: alone, and on TSA's compact tensors, against dense cuDNN in the same run.

Per length and stated block density (Llama-3.1-8B attention shapes, bf16, batch 1, random inputs):
  dense      SDPA, cuDNN first (the fastest dense backend on H200, native GQA)
  bs         block selection (last-block attention, pooled estimate, JS test, coverage) + the Triton kernel
  tsa        TSA at the paper's kept fraction, dense attention on the compact tensors
  tsa+bs     TSA, then block-sparse attention on the compact tensors at the same density
and the whole-model attention speedup of the paper's composition (every layer block-sparse, half the layers also
TSA): 2 dense / (bs + tsa+bs). Random inputs have no sparse structure, so the density is forced (the selection's
work is still done on every call); the density the coverage rule picks on them is recorded too.
With --prefill, a whole random-weight Llama-3.1-8B prefill runs dense and with that policy through transformers.

Usage (GPU machine): python benchmarks/block_sparse_gpu.py --output OUT.json [--lengths 32768,131072]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from tsa_patch.bench import MODEL_CONFIGS, environment, paper_kept_fraction, time_cuda
from tsa_patch.kernels.block_sparse import block_pattern, block_sparse_prefill
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.policy import LayerPolicy, TsaPolicy, knob_defaults
from tsa_patch.kernels.triton_block import block_sparse_attention
from tsa_patch.kernels.tsa import tsa_attention

GAMMA, BLOCK, JS_THRESHOLD = 0.95, 128, 0.1  # the paper's FlexPrefill settings for Llama-3.1 (min budget 1024)
_DEFAULTS = knob_defaults()  # TSA's: window 128, pooling 7, at least 1024 kept tokens
WINDOW, POOL_KERNEL, MIN_TOKENS = _DEFAULTS["window"], _DEFAULTS["pool_kernel"], _DEFAULTS["min_tokens"]


def bench_length(seq_len: int, densities: list[float]) -> dict:
    config = MODEL_CONFIGS["llama-3.1-8b"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    scaling = head_dim**-0.5
    torch.manual_seed(seq_len)
    q = torch.randn(heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(kv_heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16)
    kept = paper_kept_fraction(seq_len)
    options = dict(gamma=GAMMA, block=BLOCK, min_budget=MIN_TOKENS, js_threshold=JS_THRESHOLD, scaling=scaling)
    with sdpa_backend("auto", q.device):
        dense = time_cuda(lambda: causal_attention(q, k, v, scaling))
        tsa = time_cuda(lambda: tsa_attention(q, k, v, tau=0.005, window=WINDOW, pool_kernel=POOL_KERNEL,
                                              min_tokens=MIN_TOKENS, selection="query_head", scaling=scaling,
                                              keep_fraction=kept, backend="triton"))
        row = {"seq_len": seq_len, "tsa_kept_fraction": round(kept, 4), "dense_ms": dense.median_ms,
               "dense": asdict(dense), "tsa": asdict(tsa), "tsa_speedup": dense.median_ms / tsa.median_ms,
               "coverage_rule_density_on_random_inputs": block_pattern(q, k, **options, backend="triton").density, "densities": []}
        for density in densities:
            pattern = block_pattern(q, k, **options, density=density, backend="triton")
            selection = time_cuda(lambda: block_pattern(q, k, **options, density=density, backend="triton"))
            kernel = time_cuda(lambda: block_sparse_attention(q, k, v, pattern.index, pattern.count, BLOCK, scaling))
            alone = time_cuda(lambda: block_sparse_prefill(q, k, v, **options, density=density, backend="triton"))

            def attend(qc, kc, vc, density=density):
                return block_sparse_prefill(qc, kc, vc, **options, density=density, backend="triton")[0]

            combined = time_cuda(lambda: tsa_attention(q, k, v, tau=0.005, window=WINDOW, pool_kernel=POOL_KERNEL,
                                                       min_tokens=MIN_TOKENS, selection="query_head", scaling=scaling,
                                                       keep_fraction=kept, backend="triton", attend=attend))
            entry = {"density_asked": density, "density": pattern.density, "selection_ms": selection.median_ms,
                     "kernel_ms": kernel.median_ms, "bs_ms": alone.median_ms, "tsa_bs_ms": combined.median_ms,
                     "bs_speedup": dense.median_ms / alone.median_ms,
                     "kernel_ideal_speedup": 1.0 / pattern.density,
                     "tsa_bs_speedup": dense.median_ms / combined.median_ms,
                     "model_attention_speedup": 2 * dense.median_ms / (alone.median_ms + combined.median_ms),
                     "timings": {"selection": asdict(selection), "kernel": asdict(kernel), "bs": asdict(alone),
                                 "tsa_bs": asdict(combined)}}
            row["densities"].append(entry)
            print(f"L={seq_len} density {pattern.density:.3f}: dense {dense.median_ms:.2f} ms, bs {alone.median_ms:.2f} "
                  f"(select {selection.median_ms:.2f} + kernel {kernel.median_ms:.2f}) x{entry['bs_speedup']:.2f}, "
                  f"tsa+bs {combined.median_ms:.2f} x{entry['tsa_bs_speedup']:.2f}, model x"
                  f"{entry['model_attention_speedup']:.2f} (tsa alone x{row['tsa_speedup']:.2f})", flush=True)
    return row


def bench_prefill(seq_len: int, density: float) -> dict:
    """Whole-model prefill through transformers: dense (cuDNN first) vs every layer block-sparse, half also TSA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsa_patch.models import apply_policy_

    config = LlamaConfig(**MODEL_CONFIGS["llama-3.1-8b"])
    layers = config.num_hidden_layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        net = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda")

    def forward(**kwargs):
        with torch.no_grad():
            return net(ids, use_cache=False, logits_to_keep=1, **kwargs).logits

    net.set_attn_implementation("sdpa")
    with sdpa_backend("auto", torch.device("cuda")):
        dense = time_cuda(forward, budget_s=3.0, min_runs=2)
    kept = paper_kept_fraction(seq_len)
    policy = TsaPolicy(layers=tuple(LayerPolicy(enabled=i >= layers // 2, tau=0.005 if i >= layers // 2 else 0.0,
                                                kernel="block_sparse") for i in range(layers)),
                       window=WINDOW, min_tokens=MIN_TOKENS, activation_length=WINDOW + 1)
    apply_policy_(net, policy)
    sparse = time_cuda(lambda: forward(tsa_keep_fraction=kept, tsa_block_density=density), budget_s=3.0, min_runs=2)
    del net
    torch.cuda.empty_cache()
    return {"seq_len": seq_len, "density": density, "tsa_kept_fraction": kept, "dense_cudnn": asdict(dense),
            "tsa_bs": asdict(sparse), "speedup": dense.median_ms / sparse.median_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,65536,131072")
    parser.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    parser.add_argument("--prefill", default="", help="lengths of whole-model prefills (empty: none)")
    parser.add_argument("--prefill-density", type=float, default=0.1)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    result = {**environment(), "command": " ".join(["python"] + sys.argv), "gamma": GAMMA, "block": BLOCK,
              "js_threshold": JS_THRESHOLD, "min_budget": MIN_TOKENS,
              "layers": [bench_length(int(n), densities) for n in args.lengths.split(",")]}
    result["prefill"] = [bench_prefill(int(n), args.prefill_density) for n in args.prefill.split(",") if n]
    for row in result["prefill"]:
        print(f"prefill L={row['seq_len']}: dense {row['dense_cudnn']['median_ms']:.0f} ms, TSA+bs "
              f"{row['tsa_bs']['median_ms']:.0f} ms, x{row['speedup']:.2f}", flush=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
