"""Publishing an export to the Hugging Face Hub exactly as written.

``model.push_to_hub`` would regenerate the model card and re-save the weights; ``HfApi.upload_folder`` uploads the
folder byte for byte (card, policy, provenance, remote code). The token comes from the usual places
(``--token``, ``HF_TOKEN``, or ``hf auth login``).
"""

from __future__ import annotations

from pathlib import Path

from tsa_patch.errors import TsaError
from tsa_patch.verify import check_export, inspect_export


class HubError(TsaError):
    """The Hub cannot be reached or refuses the request."""


def download_export(repo_id: str) -> Path:
    """The local snapshot of the Hub repository ``repo_id`` with every file it holds (what verification needs:
    loading downloads only some of them); offline, the cached snapshot.

    Raises:
        ModelNotFoundError: no such repository reachable from here.
    """
    from tsa_patch.models import _hub_snapshot

    return _hub_snapshot(repo_id, patterns=None)


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, create_pr: bool = False, token: str | None = None,
         verify: bool = True) -> str:
    """Verify the export folder (``inspect_export``), create ``repo_id`` if needed and upload the folder as
    written; returns the commit or PR URL.

    Args:
        folder: an export folder (``tsa-patch export``).
        repo_id: "org/name" on the Hub.
        private: create the repository private (no effect on an existing one).
        revision: branch to commit to (created from main if missing); None commits to main.
        commit_message: defaults to "Upload Token Sparse Attention export (tsa-patch)".
        create_pr: open a pull request instead of committing directly.
        token: Hub token; None uses ``HF_TOKEN`` or the stored login.
        verify: refuse to upload a folder that fails verification; False uploads it as it is.

    Raises:
        TsaError: ``folder`` is not an export, or fails verification.
        HubError: offline, not authenticated, not allowed, or any other Hub failure (one line, with the fix).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    folder = check_export(folder)
    if verify:
        verify_before_upload(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload Token Sparse Attention export (tsa-patch)")
    except OfflineModeIsEnabled:
        raise HubError("the Hub is unreachable: HF_HUB_OFFLINE is set; unset it on a machine with network access.") from None
    except LocalTokenNotFoundError:
        raise HubError("no Hugging Face token found; run `hf auth login`, set HF_TOKEN, or pass --token.") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise HubError(f"the Hub refused the upload to '{repo_id}' (HTTP {status}); check that your token has "
                           "write access to that namespace.") from None
        raise HubError(f"the Hub request for '{repo_id}' failed: {str(err).splitlines()[0]}") from None
    except (HTTPError, OSError, ValueError) as err:  # connection errors, invalid repo ids
        raise HubError(f"cannot push to '{repo_id}': {type(err).__name__}: {str(err).splitlines()[0]}; check the "
                       "repository id and your network.") from None
    return getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)


def verify_before_upload(folder: Path) -> None:
    """Raise ``TsaError`` unless every check of ``inspect_export`` passes."""
    inspection = inspect_export(folder)
    if not inspection.ok:
        raise TsaError(f"'{folder}' fails verification: {'; '.join(inspection.problems)}; nothing was uploaded. "
                       f"See `tsa-patch inspect {folder}`, re-export it, or pass --no-verify to upload it as it is.")
