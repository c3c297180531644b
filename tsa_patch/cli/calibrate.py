"""`tsa-patch calibrate [MODEL]`: choose per-layer tau against an accuracy budget, and write a policy file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tsa_patch.calibrate import (CONSERVATIVE_ACTIVATION_LENGTH, DEFAULT_LOCAL_KEYS, DEFAULT_MAX_KL, CalibrationConfig,
                                 calibrate)
from tsa_patch.models import load_model, resolve_model
from tsa_patch.plots import plot_calibration
from tsa_patch.policy_file import write_policy
from tsa_patch.cli._options import DEFAULT_POLICY_PATH, DeviceOpt, JsonOpt, comma_separated, resolve_device
from tsa_patch.cli._output import Output, handle_errors

CALIBRATE_EXAMPLES = f"""
Examples:

  tsa-patch calibrate                                   # embedded SmolLM2-135M-Instruct, Shakespeare, KL <= {DEFAULT_MAX_KL}

  tsa-patch calibrate ./my-llama --data kjv --samples 8 --seq-len 4096 --min-agreement 0.95

  tsa-patch calibrate ./my-llama --target-speedup 1.5 --report report.json --plot tradeoff.png

  tsa-patch calibrate --method drift --tau 0.005 --delta 0.5      # the paper's rule

  tsa-patch calibrate --seq-len 4096 --block-sparse --block-size 64  # also choose block-sparse layers

  tsa-patch calibrate --seq-len 4096 --rows kept       # the paper's compression: only kept tokens' rows computed

  tsa-patch calibrate qwen.gguf --device cuda --seq-len 32000   # timed on the GPU: options priced by time saved

  tsa-patch calibrate qwen.gguf --device cuda --seq-len 32000 --taus 0.005,0.02,0.05,0.1,0.2,0.3,0.5   # other taus
"""
_DEFAULTS = CalibrationConfig()


@handle_errors
def calibrate_command(
    model: Annotated[str | None, typer.Argument(help="Hub id, model folder or .gguf file; default: the embedded SmolLM2-135M-Instruct.")] = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Corpus (shakespeare, kjv, paul-graham), a .txt/.jsonl/.parquet file or folder, or a datasets id.")] = _DEFAULTS.data,
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = _DEFAULTS.samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Prompt tokens per sequence (bounded by the model's context).")] = _DEFAULTS.seq_len,
    seed: Annotated[int, typer.Option(help="Sampling seed; the same seed gives the same policy.")] = _DEFAULTS.seed,
    method: Annotated[str, typer.Option(help="budget (per-layer tau from measurements) or drift (the paper's rule).")] = _DEFAULTS.method,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help=f"Budget: mean KL vs dense over the continuation, nats (default {DEFAULT_MAX_KL}).")] = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="Budget: top-1 agreement with dense over the continuation.")] = None,
    target_speedup: Annotated[float | None, typer.Option("--target-speedup", help="Reach this estimated attention speedup with the least error.")] = None,
    match_paper: Annotated[bool, typer.Option("--match-paper", help="Budget: the KL the paper's rule measures on the same samples.")] = False,
    holdout: Annotated[int, typer.Option(help="Held-out sequences that verify the budget.")] = _DEFAULTS.holdout,
    continuation: Annotated[int, typer.Option(help="Tokens after each prompt decoded densely and compared with dense.")] = _DEFAULTS.continuation,
    tau: Annotated[float, typer.Option(help="drift method: coverage threshold of the sparse layers, in [0, 1).")] = _DEFAULTS.tau,
    delta: Annotated[float, typer.Option(help="drift method: layers at or below this drift quantile go sparse.")] = _DEFAULTS.delta,
    taus: Annotated[str, typer.Option(help="Budget: comma-separated taus measured in every layer, each one an option of the search (dense always is one).")] = ",".join(f"{t:g}" for t in _DEFAULTS.taus),
    window: Annotated[int, typer.Option(help="Trailing queries that score tokens; always kept.")] = _DEFAULTS.window,
    pool_kernel: Annotated[int, typer.Option("--pool-kernel", help="Width of the average pool that smooths token scores (odd).")] = _DEFAULTS.pool_kernel,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="Tokens a sparse layer keeps at least, besides the window.")] = _DEFAULTS.min_tokens,
    activation_length: Annotated[int | None, typer.Option("--activation-length", help=f"Shorter prompts run dense. Default: measured on a CUDA GPU (never slower than dense; the front is then priced by the attention time each option saves there), the paper's min-tokens + window + 1 for --method drift, a conservative {CONSERVATIVE_ACTIVATION_LENGTH} without a GPU. Given, the front is priced in FLOPs.")] = None,
    selection: Annotated[str, typer.Option(help="query_head (per query head) or kv_group (per KV head, no K/V expansion).")] = _DEFAULTS.selection,
    coverage: Annotated[str, typer.Option(help="paper (the authors' Dynamic Token Coverage) or normalized (heads weighted equally; ours).")] = _DEFAULTS.coverage,
    rows: Annotated[str | None, typer.Option(help="all (ours; default: every query row attends to the kept keys) or kept (the paper's compression: a sparse layer computes only its kept tokens' query rows; default of --method drift).")] = None,
    local_keys: Annotated[int | None, typer.Option("--local-keys", help=f"Rows all: keys just before each query that it always attends to, kept or not (default {DEFAULT_LOCAL_KEYS}; 0: kept keys only; must be 0 with --rows kept).")] = None,
    dense_backend: Annotated[str, typer.Option("--dense-backend", help="auto (cuDNN first), cudnn, flash, efficient, math, or flash_attn (the flash-attn package, when installed).")] = _DEFAULTS.dense_backend,
    check_layers: Annotated[bool, typer.Option("--check-layers/--no-check-layers", help="Budget: run each layer alone at tau 0.005 and 0.02 end to end and rescale its error estimate by what it measured.")] = _DEFAULTS.check_layers,
    block_sparse: Annotated[bool, typer.Option("--block-sparse", help="Budget: the block-sparse kernel (FlexPrefill-style) alone becomes one more option of every layer, each layer checked alone on it end to end.")] = False,
    block_size: Annotated[int, typer.Option("--block-size", help="Block-sparse: tokens per block (power of two, >= 16).")] = _DEFAULTS.block_size,
    block_gamma: Annotated[float, typer.Option("--block-gamma", help="Block-sparse: attention mass the kept blocks cover, in (0, 1].")] = _DEFAULTS.block_gamma,
    block_min_budget: Annotated[int, typer.Option("--block-min-budget", help="Block-sparse: tokens each query block attends to at least.")] = _DEFAULTS.block_min_budget,
    block_js_threshold: Annotated[float, typer.Option("--block-js-threshold", help="Block-sparse: a head whose pooled estimate is this close (sqrt JS divergence) to its exact last-block attention uses the estimate.")] = _DEFAULTS.block_js_threshold,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the policy file.")] = DEFAULT_POLICY_PATH,
    report: Annotated[Path | None, typer.Option(help="Also write the full calibration report (JSON).")] = None,
    plot: Annotated[Path | None, typer.Option(help="budget method: also write a PNG of the per-layer policy and the accuracy/savings curve.")] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure MODEL on calibration text and decide, per layer, whether to sparsify attention and with which tau."""
    out = Output(json_output)
    config = CalibrationConfig(
        data=data, samples=samples, seq_len=seq_len, seed=seed, method=method, max_kl=max_kl,
        min_agreement=min_agreement, target_speedup=target_speedup, match_paper=match_paper, holdout=holdout,
        continuation=continuation, tau=tau, delta=delta, taus=comma_separated(taus, float, "taus"),
        check_layers=check_layers, block_sparse=block_sparse, window=window, pool_kernel=pool_kernel,
        min_tokens=min_tokens, activation_length=activation_length, selection=selection, coverage=coverage,
        rows=rows, local_keys=local_keys, dense_backend=dense_backend, block_size=block_size,
        block_gamma=block_gamma, block_min_budget=block_min_budget, block_js_threshold=block_js_threshold)
    device = resolve_device(device)
    with out.status("Resolving model"):
        source = resolve_model(model)
    with out.status(f"Loading {source.spec} on {device}"):
        loaded, tokenizer = load_model(source, device=device)
    with out.steps() as progress:
        result = calibrate(loaded, tokenizer, config, source_model=source.spec, progress=progress)
    path = write_policy(result.policy, output)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.report or result.policy.calibration, indent=2) + "\n")
    if plot is not None and result.report and not plot_calibration(result.report, str(plot)):
        out.hint("matplotlib is not installed: no plot written (pip install matplotlib).")
    _print_summary(out, result, source.spec, path, config)
    out.emit({"policy_file": str(path), "source_model": source.spec, "sparse_layers": result.policy.sparse_layers,
              "drift": result.drift, "policy": result.policy.to_dict(), "report": result.report})


def _print_summary(out: Output, result, spec: str, path: Path, config: CalibrationConfig) -> None:
    """The policy table and what was measured, for people (stderr)."""
    layers = result.report.get("layers") if result.report else None
    total_error = sum(layer["error"] for layer in layers) if layers else 0.0
    table = Table(title=f"TSA policy for {spec}", caption=f"written to {path}")
    for column in ("layer", "drift", "attention", "tau", "kept %", "error share %", "kernel"):
        table.add_column(column, justify="right")
    for i, (layer, drift) in enumerate(zip(result.policy.layers, result.drift)):
        kept = f"{100 * layers[i]['kept']:.1f}" if layers else "-"
        share = f"{100 * layers[i]['error'] / total_error:.1f}" if layers and total_error else "-"
        table.add_row(str(i), f"{drift:.4f}", "[cyan]sparse[/]" if layer.active else "dense", f"{layer.tau:g}",
                      kept, share, "[magenta]block-sparse[/]" if layer.block_sparse else "dense")
    out.table(table)
    if result.report:
        out.hint(_budget_line(result.report, config))
    if result.report and "pricing" in result.report:
        out.hint(_pricing_line(result.report))
    if result.report and "block_sparse" in result.report:
        out.hint(_block_sparse_line(result.report))
    out.hint(f"{len(result.policy.sparse_layers)} of {result.policy.num_layers} layers sparse. "
             f"Next: tsa-patch export OUT_DIR --policy {path}")


def _budget_line(report: dict, config: CalibrationConfig) -> str:
    chosen, paper = report["chosen"], report["paper_rule"]
    served = chosen["served_at_seq_len"]
    sparse = sum(1 for layer in report["layers"] if layer["tau"] or layer["kernel"] != "dense")
    unserved = sparse - len(served["layers"])
    engaged = (f"{unserved} of the {sparse} sparse layers engage only from longer prompts" if unserved
               else "every sparse layer engages")
    return (f"Attention FLOPs removed at {config.seq_len} tokens: {100 * chosen['attention_removed']:.1f}% with every "
            f"sparse layer engaged (estimated whole-model attention speedup "
            f"x{chosen['estimated_attention_speedup']:.2f}), {100 * served['attention_removed']:.1f}% as served there "
            f"({engaged}). "
            f"KL vs dense, calibration {chosen['calibration']['kl']:.4f} / held-out {chosen['held_out']['kl']:.4f} "
            f"(budget {report['budget']['kind']} {report['budget']['value']}). "
            f"Paper rule on the same samples: {100 * paper['attention_removed']:.1f}% removed at KL "
            f"{paper['calibration']['kl']:.4f}. Measured as a TSA prefill followed by {config.continuation} densely "
            "decoded tokens, compared with the dense model; KL is the worst of the text's own continuation, a "
            "long-range recall probe and a word-counting aggregation probe.")


def _pricing_line(report: dict) -> str:
    pricing, chosen = report["pricing"], report["chosen"]
    kernels = "; ".join(f"{'block-sparse kernel' if kernel == 'block_sparse' else 'TSA'}: time {m['overhead']:.2f} + "
                        f"{m['per_cost']:.2f} x computed share of dense, "
                        + (f"faster than dense below {100 * m['break_even_cost']:.0f}% computed"
                           if m["break_even_cost"] > 0 else "never faster than dense")
                        for kernel, m in pricing["models"].items())
    if not pricing.get("applied", True):
        return (f"Timed on {pricing['device']} at {pricing['length']} tokens ({kernels}): no option saves time there, "
                "so the front stays priced in FLOPs and the sparse layers engage only on longer prompts.")
    return (f"Front priced by time on {pricing['device']} at {pricing['length']} tokens ({kernels}): the chosen "
            f"policy is predicted to save {100 * chosen['predicted_time_saved']:.1f}% of the attention time there.")


def _block_sparse_line(report: dict) -> str:
    blocks, chosen = report["block_sparse"], report["chosen"]
    densities = [c["density"] for c in blocks["checks"]]
    span = f"{100 * min(densities):.0f}-{100 * max(densities):.0f}%" if densities else "-"
    count = len(blocks["layers"])
    return (f"Block-sparse kernel alone in {count} layer{'' if count == 1 else 's'} {blocks['layers']}, chosen per "
            f"layer on the same front as the taus; each layer alone on it computed {span} of its attention. The chosen policy "
            f"computed {100 * chosen['calibration']['attention_cost']:.1f}% of dense attention on the calibration "
            "prefills" + (" (block-sparse layers emulated in PyTorch: no CUDA with Triton)." if blocks["emulated"]
                          else "."))
