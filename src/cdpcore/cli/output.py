"""What every cdpctl command shares: the --json switch, the one place that
decides between readable text and JSON, and small formatting helpers.

In --json mode stdout carries exactly one JSON document, whatever happens
(main.py writes the error document through the same Output); everything
meant for a person (warnings, notes) goes to stderr in both modes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from cdpcore import Journal

T = TypeVar("T")
Doc = dict[str, Any]

PROG = "cdpctl"


class UsageError(Exception):
    """Bad arguments: raised by the argument parser and by commands whose
    arguments the core rejected with ValueError."""

    exit_code = 2


def add_command(subparsers: Any, name: str, help: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with what every command has: JOURNAL and --json."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help, description=description or help)
    p.add_argument("journal", metavar="JOURNAL", help="path of the journal directory")
    # SUPPRESS: a --json given before the subcommand must survive the
    # subparser's defaults, which would otherwise overwrite it with False.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON document to stdout (errors included)")
    p.add_argument("--encrypt-key", metavar="FILE", default=None,
                   help="key file of an encrypted vault replica (JOURNAL = VAULT/NAME): the journal is "
                        "rebuilt, every chunk checked, in a scratch directory under VAULT/_tmp")
    return p


def count(s: str) -> int:
    """Argument type: a non-negative integer (a seq, a limit)."""
    try:
        n = int(s)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return n


class Output:
    """Writes a command's result as text or as the single JSON document."""

    def __init__(self, json_mode: bool, stdout: TextIO | None = None,
                 stderr: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self._stream_open = False  # a streamed JSON document awaits its close
        self._stream_count = 0
        self._wrote_document = False

    # ---- for people (stderr) -------------------------------------------------

    def warn(self, message: str) -> None:
        print(f"{PROG}: warning: {message}", file=self.stderr, flush=True)

    def notes(self, notes: Iterable[str]) -> None:
        for note in notes:
            self.warn(note)

    # ---- the result (stdout) ----------------------------------------------------

    def result(self, doc: Doc, render: Callable[[Doc], Iterable[str]]) -> None:
        """The command's result: `doc` as JSON, or the lines `render` makes of it
        (rendering from the same doc keeps both views in step)."""
        if self.json_mode:
            self._write_document(doc)
        else:
            for line in render(doc):
                print(line, file=self.stdout)
        self.stdout.flush()

    def stream(self, key: str, items: Iterable[T], to_json: Callable[[T], Doc],
               to_line: Callable[[T], str]) -> int:
        """A result too long to hold in memory: written item by item. In JSON
        mode it is one document {key: [...], "count": N}, one item a line; an
        error while iterating closes it as {key: [...], "count": N, "error": {...}}
        so that stdout still holds exactly one document. Returns the count."""
        # Taking the first item before writing anything lets an error that
        # comes before any item (a bad point, say) be a plain error document.
        it = iter(items)
        pending = list(itertools.islice(it, 1))
        count = 0
        if not self.json_mode:
            for item in itertools.chain(pending, it):
                print(to_line(item), file=self.stdout)
                count += 1
            self.stdout.flush()
            return count
        self.stdout.write(f"{{{json.dumps(key)}: [")
        self._stream_open, self._stream_count = True, 0
        for item in itertools.chain(pending, it):
            self.stdout.write(("\n" if self._stream_count == 0 else ",\n") + _dumps(to_json(item)))
            self._stream_count += 1
        self._close_stream({})
        return self._stream_count

    def error(self, type_name: str, message: str, exit_code: int, extra: Doc | None = None) -> None:
        """Report the error that ends the command."""
        print(f"{PROG}: error: {message}", file=self.stderr, flush=True)
        if not self.json_mode:
            return
        err: Doc = {"type": type_name, "message": message, "exit_code": exit_code}
        err.update(extra or {})
        if self._stream_open:
            self._close_stream({"error": err})
        elif not self._wrote_document:
            self._write_document({"error": err})
        self.stdout.flush()

    def _write_document(self, doc: Doc) -> None:
        # A second document would make stdout unparseable; that is a bug here.
        assert not self._wrote_document, "cdpctl wrote two JSON documents"
        self._wrote_document = True
        self.stdout.write(_dumps(doc, indent=2) + "\n")

    def _close_stream(self, tail: Doc) -> None:
        self._stream_open = False
        self._wrote_document = True
        rest = "".join(f", {json.dumps(k)}: {_dumps(v)}" for k, v in tail.items())
        self.stdout.write(f"\n], \"count\": {self._stream_count}{rest}}}\n")


def _dumps(doc: Any, indent: int | None = None) -> str:
    # ensure_ascii: paths that are not valid UTF-8 (surrogate escapes) and
    # control characters come out as \u escapes, never as raw bytes.
    return json.dumps(doc, ensure_ascii=True, indent=indent)


@contextmanager
def open_journal(path: str, out: Output, readonly: bool = True,
                 report_recovery: bool = True, encrypt_key: str | None = None) -> Iterator[Journal]:
    """Journal.open, with what opening found (a torn tail, a rebuilt head)
    told on stderr: the operator should know even when the command succeeds.
    Commands that print the notes themselves pass report_recovery=False.
    With encrypt_key, path is an encrypted vault replica, materialised first."""
    if encrypt_key is not None:
        from cdpcore.vault.sealed import materialized

        with materialized(path, encrypt_key) as jdir:
            with open_journal(jdir, out, readonly, report_recovery) as j:
                yield j
        return
    journal = Journal.open(path, readonly=readonly)
    try:
        if report_recovery:
            out.notes(journal.recovery)
        yield journal
    finally:
        journal.close()


# ---- formatting --------------------------------------------------------------------


def text(s: str | None, none: str = "-") -> str:
    """A path or name for a terminal: bare when harmless, else JSON-quoted so
    that spaces stay visible and control characters cannot drive the terminal."""
    if s is None:
        return none
    if s and s.isprintable() and not any(c.isspace() or c in "\"'\\" for c in s):
        return s
    return json.dumps(s)


def size(n: int) -> str:
    """Bytes, with a binary-unit figure for people when it helps."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            figure = n / factor
            shown = f"{figure:.0f}" if figure == int(figure) else f"{figure:.1f}"
            return f"{n} bytes ({shown} {unit})"
    return f"{n} bytes"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def mode(m: int) -> str:
    return f"{m:04o}"


def fields(pairs: Iterable[tuple[str, Any]]) -> Iterator[str]:
    """'label  value' lines, labels padded to one column."""
    rows = [(k, v) for k, v in pairs]
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        yield f"{k:<{width}}  {v}"


def hexdump(data: bytes, start: int = 0) -> Iterator[str]:
    """The classic 16-bytes-a-line dump: offset, hex, printable ASCII."""
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        yield f"{start + i:08x}  {hx:<47}  |{asc}|"
