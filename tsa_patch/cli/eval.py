"""`tsa-patch eval MODEL`: accuracy of dense and TSA side by side on an offline long-context suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tsa_patch.suite import TASKS
from tsa_patch.errors import TsaError
from tsa_patch.cli._options import DeviceOpt, JsonOpt, check_writable, comma_separated, resolve_device
from tsa_patch.cli._output import Output, handle_errors

EVAL_EXAMPLES = """
Examples:

  tsa-patch eval out/demo                               # an export folder: 8 tasks x 2K, 4K x 2 samples + perplexity

  tsa-patch eval SmolLM2-135M-Instruct --policy tsa_policy.json --tasks niah_single,vt --lengths 4096

  tsa-patch eval org/name-tsa --output eval.json --plot eval.png --json
"""


@handle_errors
def eval_command(
    model: Annotated[str, typer.Argument(help="An export folder or hub id, or a model with --policy.")],
    policy: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy file to apply to a non-exported MODEL.")] = None,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks; default: all.")] = ",".join(TASKS),
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths in tokens.")] = "2048,4096",
    samples: Annotated[int, typer.Option(help="Samples per task and length.")] = 2,
    seed: Annotated[int, typer.Option(help="Suite seed.")] = 0,
    perplexity_samples: Annotated[int, typer.Option("--perplexity-samples", help="Held-out texts per length for perplexity (0 skips).")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together, left-padded (each sequence keeps the tokens it keeps alone).")] = 1,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the full report (JSON, with every output).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of accuracy against length.")] = None,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Run an offline RULER-style suite and perplexity with dense attention and with TSA on the same inputs."""
    from tsa_patch.evaluate import EvalConfig, evaluate
    from tsa_patch.models import load_patched

    out = Output(json_output)
    config = EvalConfig(tasks=comma_separated(tasks, str, "tasks"), lengths=comma_separated(lengths, int, "lengths"),
                        samples=samples, seed=seed, perplexity_samples=perplexity_samples, batch_size=batch_size)
    for path, option in ((output, "--output"), (plot, "--plot")):
        if path is not None:
            check_writable(path, option)
    device = resolve_device(device)
    with out.status(f"Loading {model}"):
        loaded, tokenizer = load_patched(model, str(policy) if policy else None, device=device)
    with out.steps() as progress:
        report = evaluate(loaded, tokenizer, config, progress=progress)
    report["model"] = model
    _render(out, report, model, samples)  # the results first: a file that cannot be written loses nothing
    out.emit(report)
    _save(out, report, output, plot)


def _save(out: Output, report: dict, output: Path | None, plot: Path | None) -> None:
    """Write the report and the plot; an OSError is one line that says the results were printed."""
    from tsa_patch.evaluate import write_report
    from tsa_patch.plots import plot_eval

    written = []
    for path, option in ((output, "--output"), (plot, "--plot")):
        if path is None:
            continue
        try:
            if option == "--output":
                write_report(report, path)
            elif not plot_eval(report, str(path)):
                out.hint("matplotlib is not installed: no plot written (pip install matplotlib).")
        except OSError as err:
            raise TsaError(f"{option} '{path}' could not be written ({err.strerror or err}); the results were "
                           "printed above" + (f" and written to '{written[0]}'." if written else ".")) from None
        written.append(path)


def _render(out, report: dict, model: str, samples: int) -> None:
    """The results table, the paired comparison and the perplexity table, on stderr."""
    table = Table(title=f"{model}: dense vs TSA ({samples} samples per cell)")
    for column in ("task", "length", "dense %", "TSA %", "delta", "kept %", "attention %"):
        table.add_column(column, justify="right")
    for row in report["tasks"]:
        table.add_row(row["task"], str(row["length"]), f"{100 * row['dense']:.1f}", f"{100 * row['tsa']:.1f}",
                      f"{100 * row['delta']:+.1f}", f"{100 * row['kept']:.1f}", f"{100 * row['attention_cost']:.1f}")
    for row in report["summary"]:
        table.add_row("[bold]mean[/]", str(row["length"]), f"{100 * row['dense']:.1f}", f"{100 * row['tsa']:.1f}",
                      f"{100 * row['delta']:+.1f}", f"{100 * row['kept']:.1f}", f"{100 * row['attention_cost']:.1f}")
    out.table(table)
    out.hint("kept %: tokens kept in TSA layers; attention %: dense attention FLOPs the prefill computed, all layers."
             + (" Block-sparse layers were emulated in PyTorch (no CUDA with Triton)." if report["config"]["block_sparse_emulated"]
                else ""))
    paired = report["overall"]["paired"]
    if paired["ci95"] is not None:
        low, high = paired["ci95"]
        out.hint(f"Paired over {paired['samples']} samples: TSA better on {paired['tsa_better']}, worse on "
                 f"{paired['tsa_worse']}; mean delta {100 * paired['mean_delta']:+.1f} points "
                 f"(95% CI {100 * low:+.1f} to {100 * high:+.1f}).")
    if report["perplexity"]:
        ppl = Table(title="Perplexity of the next 64 tokens after a long prefix (dense continuation)")
        for column in ("length", "dense", "TSA", "KL (nats)", "top-1 agreement %"):
            ppl.add_column(column, justify="right")
        for row in report["perplexity"]:
            ppl.add_row(str(row["length"]), f"{row['dense']:.2f}", f"{row['tsa']:.2f}", f"{row['kl']:.4f}",
                        f"{100 * row['top1_agreement']:.1f}")
        out.table(ppl)
