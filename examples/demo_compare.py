"""Load a tsa-patch export the way a user does and compare it with the dense model on a long prompt.

    python examples/demo_compare.py out/demo [--prompt-len 4096] [--continuation 64]

The checkpoint is loaded with ``trust_remote_code=True`` only; its remote code never imports tsa_patch. The
prompt is Paul Graham essays (a domain the default calibration on Shakespeare never saw). TSA prefills the
prompt, then the continuation runs densely over its KV cache, exactly as generation would see it.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from tsa_patch.calibration.continuation import continuation_metrics
from tsa_patch.data import DEFAULT_EVALUATION_DATA, load_documents, token_samples
from tsa_patch.kernels.attention import attention_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--continuation", type=int, default=64)
    args = parser.parse_args()
    console = Console()

    model = AutoModelForCausalLM.from_pretrained(args.export_dir, trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    tsa_impl = model.config._attn_implementation
    console.print(f"Loaded [bold]{type(model).__name__}[/] from {args.export_dir} (attention: {tsa_impl})")

    documents = load_documents(DEFAULT_EVALUATION_DATA)
    [sample] = token_samples(tokenizer, documents, 1, args.prompt_len + args.continuation, seed=0)
    metrics = continuation_metrics(model, [sample], args.prompt_len, sparse_impl=tsa_impl)
    stats = model.tsa_statistics()  # of its TSA prefill (the continuation decodes densely and leaves them)

    table = Table(title=f"TSA prefill of {args.prompt_len} tokens (Paul Graham essays)")
    for column in ("layer", "attention", "kept tokens / head", "kept %"):
        table.add_column(column, justify="right")
    for s in stats:
        kept = s["kept"][0][0] if s["path"] == "sparse" and s["kept"][0] else None
        table.add_row(str(s["layer"]), s["path"], "-" if kept is None else str(kept),
                      "100" if kept is None else f"{100 * kept / s['kv_len']:.1f}")
    console.print(table)
    summary = attention_summary(stats)
    console.print(
        f"{summary['tsa_layers']} sparse layers keep {100 * summary['kept_fraction']:.1f}% of tokens on average; "
        f"the prefill computed {100 * summary['attention_cost']:.0f}% of the dense attention FLOPs.\n"
        f"Over the next {args.continuation} tokens, decoded densely after the TSA prefill: "
        f"top-1 agreement with dense {100 * metrics.top1_agreement:.1f}%, KL {metrics.kl:.4f} nats, "
        f"KL at the first generated token {metrics.last_prompt_kl:.4f}, "
        f"perplexity {torch.tensor(metrics.tsa_nll).exp():.2f} (dense {torch.tensor(metrics.dense_nll).exp():.2f})."
    )


if __name__ == "__main__":
    main()
