"""Per-head token budgets against the head-averaged count, on the real SmolLM2-135M-Instruct (CPU, float32).

    python benchmarks/per_head_budget.py [--samples 2] [--prompt-len 4096] [--continuation 64] [--taus ...]

Dynamic Token Coverage gives every head of a layer the same count K, set by the head-averaged scores (the
authors' rule: the mean over heads of the raw pooled scores, normalised; the ascending tail of n tokens with
mass < tau and one more is dropped). A peaked head then keeps as many tokens as a diffuse one. The per-head
variant applies the same rule to each head's own normalised scores, so each head keeps its own K_h. Both run the
same code here (each head's kept tokens compressed and attended alone with SDPA; only the counts differ), on
the same layers at one tau (default: the later half, where TSA is nearly free on the real Qwen model), and are
compared on one front: the KL of the continuation after the prefill (natural text and the recall probe) against
the attention FLOPs computed (the mean over all layers, a dense one costing 1, of the mean over heads of
``(K_h / L)^2``). The runtime's own TSA at the first tau checks the stand-in (its head-averaged KL must match).
Writes ``benchmarks/results/per-head-budget-smollm2.json``.

A research probe, not the runtime: the runtime's kernels assume one count per layer (compact tensors of one
length); per-head counts would need varlen attention or padding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tsa_patch.bench import environment
from tsa_patch.calibration.continuation import compare_with_dense, dense_reference, recall_probe
from tsa_patch.data import DEFAULT_EVALUATION_DATA, load_documents, token_samples
from tsa_patch.kernels import attention as attention_module
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy
from tsa_patch.kernels.reference import kept_count_ref
from tsa_patch.kernels.tsa import token_scores
from tsa_patch.models import apply_policy_, load_model, resolve_model


def per_head_counts(pooled: torch.Tensor, tau: float, min_tokens: int) -> torch.Tensor:
    """The authors' coverage rule on each head's own normalised scores: (Hs,) kept candidate counts."""
    candidates = pooled.shape[1]
    normalised = pooled / (pooled.sum(dim=-1, keepdim=True) + 1e-8)
    tail_mass = torch.sort(normalised, dim=-1).values.cumsum(dim=-1)
    below = (tail_mass < tau).sum(dim=-1)
    dropped = torch.where(below > 0, below + 1, below)
    return (candidates - dropped).clamp(min(min_tokens, candidates), candidates)


def head_budget_attention(record: list, per_head: bool):
    """A stand-in for ``tsa.tsa_attention`` (full prefills, query_head selection) whose heads keep ``K_h`` tokens:
    their own counts with ``per_head``, else the layer's head-averaged count. Appends (Hq,) kept counts to
    ``record``."""

    def attend(query, key, value, *, tau, window, pool_kernel, min_tokens, selection, scaling, coverage="paper",
               softcap=None, dense_backend="auto", keep_fraction=None, backend="torch", attend=None):
        num_heads, length, _ = query.shape
        group = num_heads // key.shape[0]
        pooled = token_scores(query, key, window=window, pool_kernel=pool_kernel, selection="query_head",
                              scaling=scaling, backend="torch")
        candidates = pooled.shape[1]
        if per_head:
            counts = per_head_counts(pooled, tau, min_tokens)
        else:
            counts = kept_count_ref(pooled, tau, min_tokens, "paper").expand(num_heads)
        order = pooled.argsort(dim=-1, descending=True, stable=True)
        out = query.new_zeros(length, num_heads, query.shape[2])
        tail = torch.arange(candidates, length)
        for head in range(num_heads):
            kept = torch.cat([order[head, : int(counts[head])].sort().values, tail])
            q = query[head, kept][None]
            k, v = key[head // group, kept][None], value[head // group, kept][None]
            out[kept, head] = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)[0]
        record.append((counts + (length - candidates)).tolist())
        return out, torch.arange(length)[None].expand(num_heads, -1)

    return attend


def attention_cost(record: list, length: int, sparse: int, layers: int) -> float:
    """The computed fraction of causal attention FLOPs, as ``attention.attention_summary`` counts it: the mean over
    all ``layers`` (a dense one costs 1) of the mean over heads of (K_h / L)^2, averaged over the samples."""
    per_sparse_layer = sum(sum((k / length) ** 2 for k in counts) / len(counts) for counts in record) / len(record)
    return (layers - sparse + sparse * per_sparse_layer) / layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--taus", default="0.005,0.001,0.02,0.05")
    parser.add_argument("--first-layer", type=int, default=15, help="sparse layers: this one to the last")
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = resolve_model(None)
    model, tokenizer = load_model(source)
    layers = model.config.num_hidden_layers
    sparse_layers = list(range(args.first_layer, layers))
    natural = token_samples(tokenizer, load_documents(DEFAULT_EVALUATION_DATA), args.samples,
                            args.prompt_len + args.continuation, seed=1)
    probes = {"natural": natural, "recall": [recall_probe(s, args.prompt_len, seed=i) for i, s in enumerate(natural)]}
    references = {name: dense_reference(model, samples, args.prompt_len) for name, samples in probes.items()}
    original = attention_module.tsa_attention
    rows = []
    try:
        for i, tau in enumerate(float(t) for t in args.taus.split(",")):
            apply_policy_(model, TsaPolicy.uniform(layers, tau, sparse_layers, coverage="paper"))
            for variant in (("runtime",) if i == 0 else ()) + ("head_averaged", "per_head"):
                start, row = time.time(), {"tau": tau, "variant": variant}
                for name, samples in probes.items():
                    record: list = []
                    attention_module.tsa_attention = (original if variant == "runtime" else
                                                      head_budget_attention(record, variant == "per_head"))
                    metrics = compare_with_dense(model, samples, args.prompt_len, references[name], ATTENTION_KEY)
                    cost = (attention_cost(record, args.prompt_len, len(sparse_layers), layers) if record
                            else metrics.attention_cost)
                    row[name] = {"kl": round(metrics.kl, 6), "top1_agreement": round(metrics.top1_agreement, 4),
                                 "attention_cost": round(cost, 4)}
                row["seconds"] = round(time.time() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        attention_module.tsa_attention = original
    out = Path("benchmarks/results/per-head-budget-smollm2.json")
    out.write_text(json.dumps({"environment": environment(), "command": "python benchmarks/per_head_budget.py "
                               f"--samples {args.samples} --prompt-len {args.prompt_len} --continuation "
                               f"{args.continuation} --taus {args.taus} --first-layer {args.first_layer}", "model": source.spec,
                               "sparse_layers": sparse_layers, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
