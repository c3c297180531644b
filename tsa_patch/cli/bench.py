"""`tsa-patch bench`: TSA against dense SDPA on this machine's CUDA GPU, per layer and whole-model prefill."""

from __future__ import annotations

import datetime
import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tsa_patch.errors import TsaError
from tsa_patch.plots import plot_speedup
from tsa_patch.cli._options import JsonOpt
from tsa_patch.cli._output import Output, handle_errors

BENCH_EXAMPLES = """
Examples:

  tsa-patch bench                                       # Llama-3.1-8B shapes, 4K..128K, paper operating point

  tsa-patch bench --lengths 8192,32768 --prefill-lengths none --selection both --plot speedup.png
"""


def _lengths(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TsaError(f"lengths must be comma-separated integers or 'none'; got '{text}'.") from None
    if any(v < 256 for v in values):
        raise TsaError(f"every length must be at least 256 tokens; got {values}.")
    return values


@handle_errors
def bench_command(
    model: Annotated[str, typer.Option(help="Shapes to use: llama-3.1-8b or smollm2-135m.")] = "llama-3.1-8b",
    lengths: Annotated[str, typer.Option(help="Per-layer sequence lengths, comma-separated.")] = "4096,8192,16384,32768,65536,131072",
    prefill_lengths: Annotated[str, typer.Option("--prefill-lengths", help="Whole-model prefill lengths, or 'none'.")] = "8192,32768,131072",
    selection: Annotated[str, typer.Option(help="query_head, kv_group or both.")] = "query_head",
    kept_fraction: Annotated[float | None, typer.Option("--kept-fraction", help="Fixed kept fraction; default: the paper's operating point per length.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Results JSON; default benchmarks/results/bench-<card>-<date>.json.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG of speedup against length.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Time Token Sparse Attention against every dense SDPA backend on this GPU (needs CUDA and Triton)."""
    import torch

    from tsa_patch import bench
    from tsa_patch.kernels.tsa import HAS_TRITON

    out = Output(json_output)
    if not torch.cuda.is_available() or not HAS_TRITON:
        raise TsaError("tsa-patch bench needs a CUDA GPU and Triton; run it on a GPU machine.")
    if model not in bench.MODEL_CONFIGS:
        raise TsaError(f"--model must be one of {sorted(bench.MODEL_CONFIGS)}; got '{model}'.")
    if selection not in ("query_head", "kv_group", "both"):
        raise TsaError(f"--selection must be query_head, kv_group or both; got '{selection}'.")
    if kept_fraction is not None and not 0.0 < kept_fraction <= 1.0:
        raise TsaError(f"--kept-fraction must be in (0, 1]; got {kept_fraction}.")
    layer_lengths, prefill = _lengths(lengths), _lengths(prefill_lengths)
    selections = ["query_head", "kv_group"] if selection == "both" else [selection]

    def fraction(seq_len: int) -> float:
        return bench.paper_kept_fraction(seq_len) if kept_fraction is None else kept_fraction

    env = bench.environment()
    layer_rows, prefill_rows = [], []
    with out.progress("Per-layer attention", len(layer_lengths) * len(selections)) as step:
        for mode in selections:
            for seq_len in layer_lengths:
                layer_rows.append(bench.bench_layer(model, seq_len, fraction(seq_len), mode))
                step()
    with out.progress("Whole-model prefill", len(prefill)) as step:
        for seq_len in prefill:
            prefill_rows.append(bench.bench_prefill(model, seq_len, fraction(seq_len)))
            step()

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    card = env["card"].replace(" ", "-")
    path = output or Path("benchmarks/results") / f"bench-{card}-{stamp}.json"
    command = "tsa-patch bench " + shlex.join(
        ["--model", model, "--lengths", lengths, "--prefill-lengths", prefill_lengths, "--selection", selection]
        + ([] if kept_fraction is None else ["--kept-fraction", str(kept_fraction)]))
    result = {"environment": env, "command": command, "operating_point":
              "paper (17% dropped at 4K to 54% at 128K, log-interpolated)" if kept_fraction is None
              else f"fixed kept fraction {kept_fraction}", "layers": layer_rows, "prefill": prefill_rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None and not plot_speedup(layer_rows, prefill_rows, env["card"], str(plot)):
        out.hint("matplotlib is not installed: no plot written (pip install matplotlib).")

    _print_tables(out, model, env["card"], path, layer_rows, prefill_rows)
    out.emit(result)


def _print_tables(out: Output, model: str, card: str, path: Path, layer_rows: list[dict], prefill_rows: list[dict]):
    table = Table(title=f"One attention layer, {model} shapes, {card}; ms, speedups vs dense cuDNN",
                  caption=f"written to {path}")
    for column in ("L", "selection", "kept", "dense cuDNN", "TSA synced", "TSA sync-free", "sync-free graph",
                   "runtime path", "speedup", "ideal", "overhead % dense"):
        table.add_column(column, justify="right")
    for r in layer_rows:
        graph = r["sync_free"]["cuda_graph"]
        table.add_row(str(r["seq_len"]), r["selection"], f"{r['kept_tokens'] / r['seq_len']:.2f}",
                      f"{r['dense']['sdpa-cudnn']['median_ms']:.3f}", f"{r['synced']['total']['median_ms']:.3f}",
                      f"{r['sync_free']['total']['median_ms']:.3f}",
                      f"{graph['median_ms']:.3f}" if "median_ms" in graph else "failed", r["runtime_path"],
                      f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x", f"{r['overhead_pct_of_dense']:.1f}")
    out.table(table)
    if prefill_rows:
        table = Table(title="Whole-model prefill (half the layers sparse), ms")
        for column in ("L", "kept", "dense default", "dense cuDNN", "TSA", "TSA sync-free", "vs cuDNN", "vs default"):
            table.add_column(column, justify="right")
        for r in prefill_rows:
            table.add_row(str(r["seq_len"]), f"{r['kept_fraction']:.2f}", f"{r['dense-default']['median_ms']:.1f}",
                          f"{r['dense-cudnn']['median_ms']:.1f}", f"{r['tsa']['median_ms']:.1f}",
                          f"{r['tsa-sync-free']['median_ms']:.1f}", f"{r['speedup']:.2f}x",
                          f"{r['speedup_vs_default']:.2f}x")
        out.table(table)
