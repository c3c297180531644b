"""`tsa-patch push` and `export --push-to-hub`: the upload calls, and clear errors offline or without an export."""

from __future__ import annotations

import huggingface_hub
import pytest


class _FakeApi:
    """Records the HfApi calls tsa-patch makes (no network)."""

    calls: list = []

    def __init__(self, token=None):
        _FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        _FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        _FakeApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        _FakeApi.calls.append(("upload_folder", kwargs))
        return type("Info", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/abc", "pr_url": None})()


@pytest.fixture
def fake_api(monkeypatch):
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    return _FakeApi


def test_push_uploads_the_folder_as_written(cli, small_export, fake_api):
    folder, _ = small_export
    result = cli.invoke("push", folder, "org/name", "--private", "--revision", "tsa", "--commit-message", "hello",
                        "--token", "hf_x", "--json")
    assert result.exit_code == 0, result.stderr
    assert cli.json(result.stdout)["url"] == "https://hf.co/org/name/commit/abc"
    kinds = [c[0] for c in fake_api.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    assert fake_api.calls[0][1] == "hf_x"
    assert fake_api.calls[1][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    upload = fake_api.calls[3][1]
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "org/name"
    assert upload["revision"] == "tsa" and upload["commit_message"] == "hello" and upload["create_pr"] is False


def test_export_push_to_hub(cli, tmp_path, small_export, fake_api):
    from tsa_patch.policy_file import write_policy

    _, policy = small_export
    policy_file = write_policy(policy, tmp_path / "p.json")
    result = cli.invoke("export", tmp_path / "out", "--policy", policy_file, "--push-to-hub", "org/name", "--json")
    assert result.exit_code == 0, result.stderr
    assert cli.json(result.stdout)["hub_url"] == "https://hf.co/org/name/commit/abc"
    assert fake_api.calls[-1][1]["folder_path"] == str(tmp_path / "out")


def test_push_offline_is_one_clear_line(cli, small_export, monkeypatch):
    folder, _ = small_export
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = cli.invoke("push", folder, "org/name", "--token", "hf_x")
    cli.assert_one_line_error(result, "the Hub is unreachable: HF_HUB_OFFLINE is set")


def test_push_refuses_a_folder_that_is_not_an_export(cli, tmp_path):
    result = cli.invoke("push", tmp_path, "org/name")
    cli.assert_one_line_error(result, "is not a tsa-patch export")


def test_push_verifies_before_it_uploads(cli, export_copy):
    (export_copy / "notes.txt").write_text("not part of the export\n")
    result = cli.run("push", export_copy, "org/name", "--token", "hf_x")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                f"'{export_copy}' fails verification: notes.txt (unexpected); nothing was uploaded")
    assert "--no-verify" in result.stderr
    # --no-verify skips the check: this push gets as far as the Hub, which is offline here
    result = cli.run("push", export_copy, "org/name", "--token", "hf_x", "--no-verify")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, "the Hub is unreachable")
