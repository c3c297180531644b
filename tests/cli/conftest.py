"""CLI helpers: invoke the Typer app in-process or as a real `tsa-patch` process, and check the one-line-error
contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tsa_patch.cli.app import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# The console script of the environment running the tests: what a user's shell runs.
TSA_PATCH = Path(sys.executable).with_name("tsa-patch")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TSA_DEBUG", None)
    return env


def start(*args, cwd: Path | None = None) -> subprocess.Popen:
    """Start `tsa-patch ARGS` as a separate process (stdin closed, text output captured)."""
    return subprocess.Popen([str(TSA_PATCH), *map(str, args)], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(*args, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `tsa-patch ARGS` in a separate process and wait for it."""
    return subprocess.run([str(TSA_PATCH), *map(str, args)], cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_failure(returncode: int, stdout: str, stderr: str, fragment: str, code: int = 1) -> str:
    """A process's version of ``assert_one_line_error``: exit status ``code``, exactly one error line on stderr,
    containing ``fragment``, no traceback, nothing on stdout. Returns the line."""
    assert returncode == code, (returncode, stdout, stderr)
    assert "Traceback" not in stderr and stdout == "", stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], stderr
    return errors[0]


def assert_one_line_error(result, fragment: str) -> None:
    """Exit status 1, exactly one error line on stderr containing ``fragment``, nothing on stdout."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    assert result.stdout == ""


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> content): to prove a failed command wrote nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def cli():
    return type("Cli", (), {"invoke": staticmethod(invoke), "assert_one_line_error": staticmethod(assert_one_line_error),
                            "tree": staticmethod(tree), "json": staticmethod(json.loads), "run": staticmethod(run),
                            "start": staticmethod(start),
                            "assert_one_line_failure": staticmethod(assert_one_line_failure)})


@pytest.fixture
def export_copy(tmp_path, small_export):
    """A copy of the small export to tamper with, made of hard links (unlink a file before rewriting it)."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in small_export[0].iterdir():
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(options)``: a small tmpfs at a fresh folder (needs root), unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)
