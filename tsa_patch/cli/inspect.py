"""`tsa-patch inspect DIR_OR_REPO`: policy, provenance and code version of an export; verifies every hash."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
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
    """Show an export's policy and provenance and verify every file against the SHA-256 its provenance records.

    Exits with status 1 when a file is missing, modified or not listed, remote code is taken from outside the
    folder, weights are pickles, the folder has subfolders, or the policy is invalid.
    """
    from pathlib import Path

    from tsa_patch.hub import download_export
    from tsa_patch.verify import inspect_export

    out = Output(json_output)
    with out.status(f"Verifying {target}"):
        inspection = inspect_export(Path(target) if Path(target).is_dir() else download_export(target))
    provenance, policy = inspection.provenance, inspection.policy
    source = provenance.get("source_model")
    out.hint(escape(
        f"{target}: {source.get('spec') if isinstance(source, dict) else source} patched by tsa-patch "
        f"{provenance.get('tool_version')} on {provenance.get('created')}\n"
        f"command: {provenance.get('command')}\n"
        + (_policy_line(policy) if policy else "policy: invalid (see the checks)") + "\n"
        f"remote code {'is identical to' if inspection.code_matches_installed else 'differs from'} the runtime of "
        "the installed tsa-patch"
    ))
    table = Table(title="Checks")
    table.add_column("file")
    table.add_column("status")
    for name, status in inspection.checks.items():
        table.add_row(escape(name), "[green]ok[/]" if status == "ok" else f"[bold red]{escape(status)}[/]")
    out.table(table)
    out.emit(inspection.as_dict())
    if not inspection.ok:
        out.console.print(f"[bold red]Error:[/] {escape(target)} fails verification: "
                          f"{escape('; '.join(inspection.problems))}.", soft_wrap=True)
        raise typer.Exit(1)


def _policy_line(policy) -> str:
    from tsa_patch.card import activation_basis

    return (f"policy: {len(policy.sparse_layers)} of {policy.num_layers} layers sparse {policy.sparse_layers}, "
            f"window {policy.window}, min tokens {policy.min_tokens}, activation length {policy.activation_length} "
            f"({activation_basis(policy)}), "
            f"selection {policy.selection}, rows {policy.rows}, local keys {policy.local_keys}; block-sparse kernel in "
            f"{len(policy.block_sparse_layers)} layers {policy.block_sparse_layers}; "
            f"calibration: {policy.calibration.get('method', 'none')}")
