"""`tsa-patch inspect DIR_OR_REPO`: policy, provenance and code version of an export; verifies every hash."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from tsa_patch.cli._options import JsonOpt
from tsa_patch.cli._output import Output, handle_errors

INSPECT_EXAMPLES = """
Examples:

  tsa-patch inspect out/demo

  HF_HUB_OFFLINE=1 tsa-patch inspect my-org/SmolLM2-135M-Instruct-tsa --json
"""


@handle_errors
def inspect_command(
    target: Annotated[str, typer.Argument(help="An export folder or a hub id.")],
    json_output: JsonOpt = False,
) -> None:
    """Show an export's policy and provenance and verify its weights and remote code against the recorded SHA-256.

    Exits with status 1 when a file is missing, modified, or unexpected Python code is present.
    """
    from pathlib import Path

    from tsa_patch.models import resolve_model
    from tsa_patch.verify import inspect_export

    out = Output(json_output)
    folder = Path(target) if Path(target).is_dir() else resolve_model(target).path
    with out.status(f"Verifying {target}"):
        inspection = inspect_export(folder)
    provenance, policy = inspection.provenance, inspection.policy
    out.hint(
        f"[bold]{target}[/]: {provenance.get('source_model', {}).get('spec')} patched by tsa-patch "
        f"{provenance.get('tool_version')} on {provenance.get('created')}\n"
        f"command: {provenance.get('command')}\n"
        f"policy: {len(policy.sparse_layers)} of {policy.num_layers} layers sparse {policy.sparse_layers}, "
        f"window {policy.window}, min tokens {policy.min_tokens}, activation length {policy.activation_length}, "
        f"selection {policy.selection}; block-sparse kernel in {len(policy.block_sparse_layers)} layers "
        f"{policy.block_sparse_layers}; calibration: {policy.calibration.get('method', 'none')}\n"
        f"remote code {'is identical to' if inspection.code_matches_installed else 'differs from'} the runtime of "
        "the installed tsa-patch"
    )
    table = Table(title="SHA-256 against tsa_provenance.json")
    table.add_column("file")
    table.add_column("status")
    for name, status in inspection.checks.items():
        table.add_row(name, "[green]ok[/]" if status == "ok" else f"[bold red]{status}[/]")
    out.table(table)
    out.emit(inspection.as_dict())
    if not inspection.ok:
        bad = [name for name, status in inspection.checks.items() if status != "ok"]
        out.console.print(f"[bold red]Error:[/] {target} does not match its provenance: {', '.join(bad)}.",
                          soft_wrap=True)
        raise typer.Exit(1)
