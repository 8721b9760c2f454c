"""cdpctl: the operator's command line for cdpcore journals.

This module parses the arguments, runs one command and turns every way a
command can end into an exit code and one line on stderr (plus the error
document on stdout with --json). A command is a module in this package with
add_parser(subparsers) and run(args, out) -> int; to add one, write the
module and list it in COMMANDS. Exit codes: docs/cli.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from cdpcore import __version__
from cdpcore.cli import (
    audit,
    baseline,
    bookmark,
    checkpoint,
    diff,
    info,
    init,
    log,
    pki,
    points,
    protect,
    prune,
    restore,
    resync,
    rollback,
    serve,
    ship,
    show,
    status,
    timeline,
    verify,
)
from cdpcore.cli.output import PROG, Output, UsageError
from cdpcore.errors import CdpError, CorruptJournal

COMMANDS: list[ModuleType] = [init, info, log, show, verify, bookmark, points, restore, rollback,
                              diff, timeline, audit, prune, checkpoint, protect, resync, baseline, pki, serve, ship, status]

EXIT_INTERNAL = 1
EXIT_OSERROR = 10
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE


class Parser(argparse.ArgumentParser):
    """argparse prints usage and exits on bad arguments; raising instead lets
    main() report them like every other error (one line, or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Inspect, verify and restore cdpcore journals.",
                    epilog="Exit codes and JSON output: see docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--json", action="store_true", default=False,
                        help="write one JSON document to stdout (errors included)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(run=command.run)
    return parser


def wants_json(argv: Sequence[str]) -> bool:
    """Whether --json was asked for, read before parsing so that a usage
    error can be reported as JSON too. Words after '--' are operands."""
    words = list(argv)
    if "--" in words:
        words = words[: words.index("--")]
    return "--json" in words


def describe_oserror(e: OSError) -> str:
    """strerror and the path(s) involved, without Python's '[Errno N]'."""
    message = e.strerror or str(e)
    paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
    if paths:
        message += ": " + " -> ".join(paths)
    return message


def classify(e: BaseException) -> tuple[str, str, int, dict[str, Any]]:
    """(type, message, exit code, extra JSON fields) of the error ending a run."""
    if isinstance(e, UsageError):
        return "UsageError", str(e), e.exit_code, {}
    if isinstance(e, CdpError):
        extra: dict[str, Any] = {}
        if isinstance(e, CorruptJournal) and e.segment is not None:
            extra = {"segment": e.segment, "offset": e.offset}
        return type(e).__name__, str(e), e.exit_code, extra
    if isinstance(e, OSError):
        path = os.fsdecode(e.filename) if e.filename is not None else None
        return type(e).__name__, describe_oserror(e), EXIT_OSERROR, {"errno": e.errno, "path": path}
    if isinstance(e, KeyboardInterrupt):
        return "Interrupted", "interrupted", EXIT_INTERRUPTED, {}
    return "InternalError", f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL, {}


def _silence_stdout() -> None:
    # The reader went away (cdpctl log | head): later writes, including the
    # interpreter's final flush, must not fail loudly.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):
        # Paths that are not UTF-8 arrive as surrogate escapes; write them
        # back as the original bytes instead of failing on them.
        sys.stdout.reconfigure(errors="surrogateescape")
    out = Output(wants_json(argv))
    try:
        args = build_parser().parse_args(argv)
        out.json_mode = bool(args.json)
        code: int = args.run(args, out)
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as e:
        if isinstance(e, SystemExit):  # --help and --version
            raise
        type_name, message, code, extra = classify(e)
        if os.environ.get("CDPCTL_DEBUG") == "1":
            traceback.print_exc(file=sys.stderr)
        try:
            out.error(type_name, message, code, extra)
        except BrokenPipeError:
            _silence_stdout()
        return code


if __name__ == "__main__":
    sys.exit(main())
