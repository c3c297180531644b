"""`tsa-patch export` never loses a file: overwrite, races, signals, stale staging folders, unwritable OUT_DIR.

Every test runs the real `tsa-patch` console script in its own process on real files. Races and signals are timed
on a source whose weights come in three 270 MB shards (links to SmolLM2's weights), so that an export spends a few
seconds copying them: the tests act once the staging folder holds a weight file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tsa_patch.kernels.policy import TsaPolicy
from tsa_patch.policy_file import write_policy

SHARDS = 3


def _linked_copy(src: Path, dst: Path) -> None:
    """``src``'s files in ``dst`` as hard links (a real copy where links are not possible)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)


def _listing(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` with its size and inode: equal listings mean nothing was replaced."""
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_ino)
            for p in sorted(root.rglob("*"))}


def _staging_folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".tsa-staging-" in p.name) if parent.is_dir() else []


def _wait_for_staging(parent: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    """The staging folder of the export ``process`` runs, once a weight file is being written into it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for folder in _staging_folders(parent):
            if any(folder.glob("*.safetensors")):
                return folder
        if process.poll() is not None:
            pytest.fail(f"the export ended before its staging folder was seen: {process.communicate()}")
        time.sleep(0.005)
    pytest.fail("no staging folder appeared")


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.fixture(autouse=True)
def _remove_exports(tmp_path):
    """Each test writes up to a few GB of weights: remove them once it ends."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory, smollm2):
    """SmolLM2's config and tokenizer with its weights as three shards: an export that takes a few seconds."""
    folder = tmp_path_factory.mktemp("slow") / "source"
    folder.mkdir()
    for path in smollm2.path.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    for i in range(1, SHARDS + 1):
        (folder / f"model-{i:05d}-of-{SHARDS:05d}.safetensors").symlink_to(smollm2.path / "model.safetensors")
    return folder


@pytest.fixture
def policy_file(tmp_path):
    policy = TsaPolicy.uniform(30, 0.01, [20, 21], source_model="SmolLM2-135M-Instruct")
    return write_policy(policy, tmp_path / "policy.json")


@pytest.fixture
def previous_export(cli, tmp_path, policy_file):
    """A folder holding an earlier export (then the tests replace or keep it)."""
    out = tmp_path / "exports" / "model"
    result = cli.run("export", out, "--policy", policy_file)
    assert result.returncode == 0, result.stderr
    return out


# -- 1. --overwrite replaces a previous export and nothing else ----------------------------------------------------

def test_overwrite_never_deletes_the_source_or_unrelated_files(cli, tmp_path, policy_file, smollm2):
    """The issue's reproduction: `export proj --model proj/base-model --overwrite` deleted proj and the model."""
    proj = tmp_path / "proj"
    _linked_copy(smollm2.path, proj / "base-model")
    (proj / "thesis.tex").write_text("x\n")
    before = _listing(proj)
    result = cli.run("export", proj, "--policy", policy_file, "--model", proj / "base-model", "--overwrite")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                "OUT_DIR '" + str(proj) + "' is or contains the source model")
    assert _listing(proj) == before and (proj / "thesis.tex").read_text() == "x\n"
    for target in (proj / "base-model", proj / "base-model" / "model.safetensors"):
        result = cli.run("export", target, "--policy", policy_file, "--model", proj / "base-model", "--overwrite")
        cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, "is or contains the source model")
    assert _listing(proj) == before and not _staging_folders(proj)


def test_overwrite_refuses_a_folder_that_is_not_an_export(cli, tmp_path, policy_file, smollm2):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("x\n")
    (notes / "config.json").write_text("{}\n")
    before = _listing(tmp_path)
    result = cli.run("export", notes, "--policy", policy_file, "--overwrite")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                "is not a tsa-patch export; --overwrite replaces only a previous export")
    assert _listing(tmp_path) == before


def test_overwrite_refuses_an_export_holding_other_files(cli, previous_export, policy_file):
    (previous_export / "thesis.tex").write_text("x\n")
    (previous_export / "drafts").mkdir()
    before = _listing(previous_export.parent)
    result = cli.run("export", previous_export, "--policy", policy_file, "--overwrite")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                "holds files that are not part of its tsa-patch export (drafts/, thesis.tex)")
    assert _listing(previous_export.parent) == before


def test_overwrite_replaces_a_previous_export(cli, previous_export, tmp_path):
    policy = TsaPolicy.uniform(30, 0.02, [5], source_model="SmolLM2-135M-Instruct")
    policy_file = write_policy(policy, tmp_path / "other.json")
    result = cli.run("export", previous_export, "--policy", policy_file, "--overwrite")
    assert result.returncode == 0, result.stderr
    config = json.loads((previous_export / "config.json").read_text())
    assert TsaPolicy.from_dict(config["tsa_policy"]).sparse_layers == [5]
    provenance = json.loads((previous_export / "tsa_provenance.json").read_text())
    assert set(provenance["files_sha256"]) | {"tsa_provenance.json"} == {p.name for p in previous_export.iterdir()}
    assert [p.name for p in previous_export.parent.iterdir()] == ["model"]  # no staging or replaced folder left


def test_out_dir_that_is_the_current_folder(cli, tmp_path, policy_file):
    """`tsa-patch export .` was a traceback (PosixPath('.') has an empty name)."""
    for target in (".", ".."):
        result = cli.run("export", target, "--policy", policy_file, cwd=tmp_path)
        cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                    f"OUT_DIR '{target}' is the current folder or contains it")
    assert {p.name for p in tmp_path.iterdir()} == {"policy.json"}


# -- 2. the final rename destroys nothing it did not check --------------------------------------------------------

def test_a_folder_created_during_the_export_is_kept(cli, tmp_path, policy_file, slow_source):
    out = tmp_path / "out"
    process = cli.start("export", out, "--policy", policy_file, "--model", slow_source)
    _wait_for_staging(tmp_path, process)
    out.mkdir()
    (out / "mine.txt").write_text("written during the export\n")
    code, stdout, stderr = _finish(process)
    cli.assert_one_line_failure(code, stdout, stderr, f"OUT_DIR '{out}' was created or filled by something else")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text().startswith("written")
    assert not _staging_folders(tmp_path)


def test_a_file_added_to_the_previous_export_during_overwrite_is_kept(cli, previous_export, policy_file,
                                                                      slow_source):
    before = _listing(previous_export)
    process = cli.start("export", previous_export, "--policy", policy_file, "--model", slow_source, "--overwrite")
    _wait_for_staging(previous_export.parent, process)
    (previous_export / "notes.txt").write_text("mine\n")
    code, stdout, stderr = _finish(process)
    cli.assert_one_line_failure(code, stdout, stderr, "holds files that are not part of its tsa-patch export (notes.txt)")
    after = _listing(previous_export)
    assert (previous_export / "notes.txt").read_text() == "mine\n"
    assert {k: v for k, v in after.items() if k != "notes.txt"} == before  # the previous export, untouched
    assert [p.name for p in previous_export.parent.iterdir()] == ["model"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-folder", "overwrite"])
def test_concurrent_exports_into_one_folder(cli, tmp_path, policy_file, slow_source, previous_export, overwrite):
    out = previous_export if overwrite else tmp_path / "exports" / "new"
    flags = ["--overwrite"] if overwrite else []
    processes = [cli.start("export", out, "--policy", policy_file, "--model", slow_source, *flags) for _ in range(2)]
    results = sorted((_finish(p) for p in processes), key=lambda r: r[0])
    assert [r[0] for r in results] == [0, 1], results
    cli.assert_one_line_failure(*results[1], "during the export")
    provenance = json.loads((out / "tsa_provenance.json").read_text())
    assert provenance["source_model"]["spec"] == str(slow_source)
    assert set(provenance["files_sha256"]) | {"tsa_provenance.json"} == {p.name for p in out.iterdir()}
    assert not _staging_folders(out.parent) and not [p for p in out.parent.iterdir() if ".tsa-replaced-" in p.name]


# -- 4. interruption: signals clean up, stale staging folders of killed exports are removed -----------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_during_the_copy_leaves_nothing(cli, tmp_path, policy_file, slow_source, signum):
    out = tmp_path / "out"
    process = cli.start("export", out, "--policy", policy_file, "--model", slow_source)
    _wait_for_staging(tmp_path, process)
    process.send_signal(signum)
    code, stdout, stderr = _finish(process)
    cli.assert_one_line_failure(code, stdout, stderr, f"interrupted by {signum.name}; nothing was written there",
                                code=128 + signum)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]


def test_sigterm_during_overwrite_keeps_the_previous_export(cli, previous_export, policy_file, slow_source):
    before = _listing(previous_export.parent)
    process = cli.start("export", previous_export, "--policy", policy_file, "--model", slow_source, "--overwrite")
    _wait_for_staging(previous_export.parent, process)
    process.send_signal(signal.SIGTERM)
    code, stdout, stderr = _finish(process)
    cli.assert_one_line_failure(code, stdout, stderr, "interrupted by SIGTERM", code=128 + signal.SIGTERM)
    assert _listing(previous_export.parent) == before


def test_staging_of_a_killed_export_is_removed_by_the_next_one(cli, tmp_path, policy_file, slow_source):
    parent = tmp_path / "exports"
    process = cli.start("export", parent / "a", "--policy", policy_file, "--model", slow_source)
    stale = _wait_for_staging(parent, process)
    process.send_signal(signal.SIGKILL)
    assert _finish(process)[0] == -signal.SIGKILL
    assert stale.is_dir() and any(stale.iterdir())  # SIGKILL cannot be handled: the partial copy stays
    live = parent / ".b.tsa-staging-abcd1234"  # another export's, still running: it holds the lock
    live.mkdir()
    unrelated = parent / ".a.staging-mine"  # not a tsa-patch name
    unrelated.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = cli.run("export", parent / "c", "--policy", policy_file)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.is_dir() and unrelated.is_dir()
    assert (parent / "c" / "tsa_provenance.json").is_file() and not (parent / "a").exists()


# -- 6. OUT_DIR that cannot be written: one line, nothing left ----------------------------------------------------

def test_out_dir_on_a_read_only_filesystem(cli, policy_file, small_tmpfs):
    point = small_tmpfs("ro,size=1m")
    result = cli.run("export", point / "out", "--policy", policy_file)
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                "Read-only file system")
    assert "choose a folder on a writable filesystem" in result.stderr


def test_out_dir_on_a_full_disk(cli, policy_file, small_tmpfs):
    point = small_tmpfs("size=1m")
    result = cli.run("export", point / "out", "--policy", policy_file)
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, "No space left on device")
    assert "free some space or export to another disk" in result.stderr
    assert list(point.iterdir()) == []  # the partial staging folder was removed
