"""CLI helpers: invoke the Typer app in-process and check the one-line-error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tsa_patch.cli.app import app


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


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
                            "tree": staticmethod(tree), "json": staticmethod(json.loads)})
