"""`tsa-patch calibrate [MODEL]`: choose the sparse layers and tau, and write a policy file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..calibrate import CalibrationConfig, calibrate
from ..models import load_model, resolve_model
from ..policy import write_policy
from ._options import DEFAULT_POLICY_PATH, DeviceOpt, JsonOpt, resolve_device
from ._output import Output, handle_errors

CALIBRATE_EXAMPLES = """
Examples:

  tsa-patch calibrate                                   # embedded SmolLM2-135M-Instruct, Shakespeare, 4 x 2048 tokens

  tsa-patch calibrate ./my-llama --data kjv --samples 8 --seq-len 4096 --tau 0.01

  tsa-patch calibrate HuggingFaceTB/SmolLM2-360M-Instruct --data notes.jsonl -o smol360.json --json
"""
_DEFAULTS = CalibrationConfig()


@handle_errors
def calibrate_command(
    model: Annotated[str | None, typer.Argument(help="Hub id, model folder or .gguf file; default: the embedded SmolLM2-135M-Instruct.")] = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Corpus (shakespeare, kjv, paul-graham), a .txt/.jsonl/.parquet file or folder, or a datasets id.")] = _DEFAULTS.data,
    samples: Annotated[int, typer.Option(help="Number of calibration sequences.")] = _DEFAULTS.samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sequence (bounded by the model's context).")] = _DEFAULTS.seq_len,
    seed: Annotated[int, typer.Option(help="Sampling seed; the same seed gives the same policy.")] = _DEFAULTS.seed,
    tau: Annotated[float, typer.Option(help="Coverage threshold of the sparse layers, in [0, 1).")] = _DEFAULTS.tau,
    delta: Annotated[float, typer.Option(help="Drift quantile: layers at or below it go sparse (paper: 0.5).")] = _DEFAULTS.delta,
    window: Annotated[int, typer.Option(help="Trailing queries that score tokens; always kept.")] = _DEFAULTS.window,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="Tokens a sparse layer keeps at least, besides the window.")] = _DEFAULTS.min_tokens,
    activation_length: Annotated[int, typer.Option("--activation-length", help="Shorter prompts run dense.")] = _DEFAULTS.activation_length,
    selection: Annotated[str, typer.Option(help="query_head (per query head) or kv_group (per KV head, no K/V expansion).")] = _DEFAULTS.selection,
    dense_backend: Annotated[str, typer.Option("--dense-backend", help="auto (cuDNN first), cudnn, flash, efficient, math, or flash_attn (the flash-attn package, when installed).")] = _DEFAULTS.dense_backend,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the policy file.")] = DEFAULT_POLICY_PATH,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure MODEL on calibration text and decide, per layer, whether to sparsify attention and with which tau."""
    out = Output(json_output)
    config = CalibrationConfig(data=data, samples=samples, seq_len=seq_len, seed=seed, tau=tau, delta=delta,
                              window=window, pool_kernel=_DEFAULTS.pool_kernel, min_tokens=min_tokens,
                              activation_length=activation_length, selection=selection, dense_backend=dense_backend)
    device = resolve_device(device)
    with out.status("Resolving model"):
        source = resolve_model(model)
    with out.status(f"Loading {source.spec} on {device}"):
        loaded, tokenizer = load_model(source, device=device)
    with out.progress(f"Measuring representation drift on {samples} x {seq_len} tokens of {data}", samples) as step:
        result = calibrate(loaded, tokenizer, config, source_model=source.spec, on_sample=step)
    path = write_policy(result.policy, output)

    table = Table(title=f"TSA policy for {source.spec}", caption=f"written to {path}")
    for column in ("layer", "drift", "attention", "tau"):
        table.add_column(column, justify="right")
    for i, (layer, drift) in enumerate(zip(result.policy.layers, result.drift)):
        table.add_row(str(i), f"{drift:.4f}", "[cyan]sparse[/]" if layer.active else "dense", f"{layer.tau:g}")
    out.table(table)
    out.hint(f"{len(result.policy.sparse_layers)} of {result.policy.num_layers} layers sparse. "
             f"Next: tsa-patch export OUT_DIR --policy {path}")
    out.emit({"policy_file": str(path), "source_model": source.spec, "sparse_layers": result.policy.sparse_layers,
              "drift": result.drift, "policy": result.policy.to_dict()})
