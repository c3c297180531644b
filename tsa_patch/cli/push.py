"""`tsa-patch push OUT_DIR REPO_ID`: upload an export to the Hub exactly as written."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsa_patch.cli._options import JsonOpt
from tsa_patch.cli._output import Output, handle_errors

PUSH_EXAMPLES = """
Examples:

  tsa-patch push out/demo my-org/SmolLM2-135M-Instruct-tsa --private

  tsa-patch push out/demo my-org/SmolLM2-135M-Instruct-tsa --revision tsa-v1 --create-pr
"""

PrivateOpt = Annotated[bool, typer.Option(help="Create the repository private.")]


@handle_errors
def push_command(
    out_dir: Annotated[Path, typer.Argument(help="An export folder written by `tsa-patch export`.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name (created if missing).")],
    private: PrivateOpt = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to (created if missing).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="Commit message.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    token: Annotated[str | None, typer.Option(help="Hub token; default: HF_TOKEN or the stored login.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Upload even if `tsa-patch inspect` finds a problem.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Verify OUT_DIR as `tsa-patch inspect` does, then upload it to the Hub with HfApi.upload_folder
    (model.push_to_hub would overwrite the model card)."""
    from tsa_patch.hub import push

    out = Output(json_output)
    with out.status(f"Uploading {out_dir} to {repo_id}"):
        url = push(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message,
                   create_pr=create_pr, token=token, verify=not no_verify)
    out.hint(f"Pushed: {url}\nLoad it with: AutoModelForCausalLM.from_pretrained({repo_id!r}, trust_remote_code=True, "
             "revision=<commit>)")
    out.emit({"repo_id": repo_id, "url": url})
