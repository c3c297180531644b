"""The `tsa-patch` command line: wiring only; each command lives in its own module."""

from __future__ import annotations

import os

import typer

from tsa_patch import __version__
from tsa_patch.cli.bench import BENCH_EXAMPLES, bench_command
from tsa_patch.cli.calibrate import CALIBRATE_EXAMPLES, calibrate_command
from tsa_patch.cli.eval import EVAL_EXAMPLES, eval_command
from tsa_patch.cli.inspect import INSPECT_EXAMPLES, inspect_command
from tsa_patch.cli.push import PUSH_EXAMPLES, push_command
from tsa_patch.cli.export import EXPORT_EXAMPLES, export_command

app = typer.Typer(
    name="tsa-patch",
    help="Calibrate a Hugging Face causal LM for Token Sparse Attention and export a checkpoint that runs it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("calibrate", epilog=CALIBRATE_EXAMPLES)(calibrate_command)
app.command("export", epilog=EXPORT_EXAMPLES)(export_command)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_command)
app.command("push", epilog=PUSH_EXAMPLES)(push_command)
app.command("inspect", epilog=INSPECT_EXAMPLES)(inspect_command)
app.command("bench", epilog=BENCH_EXAMPLES)(bench_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tsa-patch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    """Calibrate a Hugging Face causal LM for Token Sparse Attention and export a checkpoint that runs it."""


def main() -> None:
    """Console-script entry point."""
    # tsa-patch draws its own progress on stderr; set before transformers is (lazily) imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()
