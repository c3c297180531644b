"""One output object per command: Rich on stderr for people, exactly one JSON document on stdout for scripts."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tsa_patch.errors import TsaError


class Output:
    """Progress, tables and hints go to stderr; ``emit`` writes the JSON result to stdout (``--json`` only)."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.console = Console(stderr=True, highlight=False)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner for a step of unknown length (loading, converting)."""
        with self.console.status(message):
            yield
        self.console.print(f"[green]✓[/] {message}")

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """A progress bar; yields a function that advances it by one step."""
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)
        self.console.print(f"[green]✓[/] {description}")

    @contextlib.contextmanager
    def steps(self) -> Iterator[Callable[[str, int], Callable[[], None]]]:
        """Progress for a multi-step library call: yields ``start(description, total) -> advance``; each new
        step completes the previous one."""
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=self.console) as bar:
            def start(description: str, total: int) -> Callable[[], None]:
                for task in bar.tasks:
                    bar.update(task.id, completed=task.total)
                task = bar.add_task(description, total=total)
                return lambda: bar.advance(task)

            yield start
            for task in bar.tasks:
                bar.update(task.id, completed=task.total)

    def table(self, table: Table) -> None:
        if not self.json_mode:
            self.console.print(table)

    def hint(self, message: str) -> None:
        if not self.json_mode:
            self.console.print(message)

    def emit(self, data: dict) -> None:
        """The command's result: one JSON document on stdout in ``--json`` mode, nothing otherwise."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2) + "\n")


def handle_errors(command: Callable) -> Callable:
    """Turn a ``TsaError`` into one red line on stderr and exit status 1, or the error's ``exit_code`` (128 +
    the signal for an interrupted export); the full traceback with ``TSA_DEBUG=1``."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TsaError as err:
            if os.environ.get("TSA_DEBUG") == "1":
                raise
            Console(stderr=True, highlight=False).print(f"[bold red]Error:[/] {err}", soft_wrap=True)
            raise typer.Exit(getattr(err, "exit_code", 1)) from None

    return wrapper
