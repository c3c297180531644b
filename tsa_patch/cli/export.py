"""`tsa-patch export OUT_DIR`: write a checkpoint that runs Token Sparse Attention with trust_remote_code=True."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from tsa_patch.errors import PolicyError, TsaError
from tsa_patch.export import export
from tsa_patch.models import resolve_model
from tsa_patch.policy_file import read_policy
from tsa_patch.cli._options import DEFAULT_POLICY_PATH, JsonOpt, PolicyOpt
from tsa_patch.cli._output import Output, handle_errors
from tsa_patch.cli.push import PrivateOpt

EXPORT_EXAMPLES = """
Examples:

  tsa-patch export out/smollm2-tsa                      # policy from ./tsa_policy.json, model recorded in it

  tsa-patch export out/llama-tsa --policy llama.json --model ./my-llama --overwrite
"""


@handle_errors
def export_command(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (must be absent or empty unless --overwrite).")],
    policy: PolicyOpt = DEFAULT_POLICY_PATH,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Source model; default: the one recorded in the policy.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous tsa-patch export at OUT_DIR (never anything else).")] = False,
    eval_report: Annotated[Path | None, typer.Option("--eval-report", help="A `tsa-patch eval --output` report to put in the model card.")] = None,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Then upload OUT_DIR to this Hub repo (org/name).")] = None,
    private: PrivateOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Write weights, config.json with the policy, remote code, tokenizer, model card and provenance to OUT_DIR."""
    out = Output(json_output)
    evaluation = None
    if eval_report is not None:
        try:
            evaluation = json.loads(eval_report.read_text())
        except (OSError, ValueError):
            evaluation = None
        if not isinstance(evaluation, dict) or not {"summary", "tasks", "config"} <= set(evaluation):
            raise TsaError(f"--eval-report '{eval_report}' is not a report written by `tsa-patch eval --output`.")
    loaded_policy = read_policy(policy)
    spec = model or loaded_policy.source_model
    if spec is None:
        raise PolicyError(f"policy file '{policy}' records no source model; pass --model.")
    with out.status("Resolving model"):
        source = resolve_model(spec)
    command = ["tsa-patch", "export", str(out_dir), "--policy", str(policy)]
    command += ["--model", model] if model else []
    command += ["--overwrite"] if overwrite else []
    command += ["--eval-report", str(eval_report)] if eval_report else []
    with out.status(f"Writing {out_dir}"):
        result = export(source, loaded_policy, out_dir, overwrite=overwrite, command=shlex.join(command),
                        evaluation=evaluation)
    url = None
    if push_to_hub is not None:
        from tsa_patch.hub import push

        try:
            with out.status(f"Uploading {out_dir} to {push_to_hub}"):
                url = push(result.out_dir, push_to_hub, private=private)
        except TsaError as err:
            raise TsaError(f"the export was written to '{result.out_dir}', but the upload failed: {err} Retry it with "
                           f"`tsa-patch push {shlex.quote(str(result.out_dir))} {push_to_hub}`.") from None
    out.hint(
        f"Exported {source.spec} with {len(loaded_policy.sparse_layers)} sparse layers to {result.out_dir}.\n"
        f"Load it with: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r}, trust_remote_code=True)"
    )
    if url:
        out.hint(f"Pushed: {url}")
    out.emit({"out_dir": str(result.out_dir), "source_model": source.spec, "weights_sha256": result.weights,
              "remote_code_sha256": result.remote_code, "files_sha256": result.files, "sparse_layers": loaded_policy.sparse_layers, "hub_url": url})
