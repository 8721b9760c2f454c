"""cdpctl verify JOURNAL: check every byte; exit 1 when damage is found.

With --check CMD (and --at POINT), a restore check instead: materialise the
point into a scratch directory, run CMD on it, report pass or fail (exit 11).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from cdpcore import audit
from cdpcore.cli.output import (
    Doc,
    Output,
    UsageError,
    add_command,
    open_journal,
    plural,
    size,
)
from cdpcore.errors import CorruptJournal
from cdpcore.journal import Journal, Problem, VerifyReport
from cdpcore.restore import restore

EXIT_DAMAGE = 1
EXIT_CHECK_FAILED = 11
TAIL_LINES = 20  # of the check command's output, shown and kept in JSON
TAIL_BYTES = 4096


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "verify", "check a journal for damage, or check a restore",
                    "Check the journal's metadata, every segment header and record, the "
                    "sequence chain, the index files and the audit log's chain (read-only). "
                    "Exit 0 when it is intact, 1 when damage is found. With --check, restore "
                    "--at POINT into a scratch directory and run CMD on it instead: exit 0 when "
                    "CMD exits 0, 11 when it fails.")
    p.add_argument("--at", metavar="POINT", help="with --check: the point to restore (default: latest)")
    p.add_argument("--check", metavar="CMD",
                   help="shell command run on the restored tree; {dir} is replaced by its "
                        "(quoted) path, which is also the working directory")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="with --check: kill CMD after this long (a failure)")
    p.add_argument("--scratch", metavar="DIR",
                   help="with --check: make the scratch directory in DIR (default: $TMPDIR)")
    return p


def render(doc: Doc) -> Iterator[str]:
    records = plural(doc["records"], "record")
    if doc["records"]:
        records += f" (seq {doc['first_seq']}..{doc['last_seq']})"
    yield f"{doc['path']}: checked {plural(doc['segments'], 'segment')}, {records}, {size(doc['bytes'])}"
    for p in doc["problems"]:
        yield str(Problem(**p))
    for note in doc["recovery"]:
        yield f"recovery: {note}"
    damage = sum(p["severity"] == "damage" for p in doc["problems"])
    yield "OK" if doc["ok"] else f"DAMAGED: {plural(damage, 'problem')} found"


def run(args: argparse.Namespace, out: Output) -> int:
    if args.check is None:
        if args.at is not None or args.timeout is not None or args.scratch is not None:
            raise UsageError("--at, --timeout and --scratch go with --check CMD")
    else:
        if not args.check.strip():
            raise UsageError("--check needs a command")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        return run_check(args, out)
    try:
        with open_journal(args.journal, out, encrypt_key=args.encrypt_key, report_recovery=False) as j:
            report, path, recovery = j.verify(), j.path, j.recovery
    except CorruptJournal as e:
        # Damage that stops even a read-only open is still a verify finding
        # (exit 1), not a failure to verify.
        report, path, recovery = VerifyReport(problems=[Problem("damage", str(e))]), os.path.abspath(args.journal), []
    doc = {"path": path, **report.to_json(), "recovery": recovery}
    out.result(doc, render)
    return 0 if report.ok else EXIT_DAMAGE


# ---- restore check ------------------------------------------------------------------


def _remove_tree(path: str) -> None:
    """rmtree that also gets through directories the restore made read-only."""

    def unlock(func: Any, p: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        func(p)

    shutil.rmtree(path, onerror=unlock)


def _tail(output: bytes) -> tuple[str, bool]:
    """The last TAIL_LINES lines (at most TAIL_BYTES) and whether that is less than all."""
    text = output.decode("utf-8", "replace")
    lines = text.splitlines()
    tail = "\n".join(lines[-TAIL_LINES:])[-TAIL_BYTES:]
    return tail, len(tail) < len(text.rstrip("\n"))


def _run_command(command: str, cwd: str, timeout: float | None) -> tuple[int, bool, bytes, float]:
    """(exit code, timed out, stdout+stderr, seconds) of command run by the shell.
    It gets its own session so that a timeout kills everything it started."""
    t0 = time.monotonic()
    proc = subprocess.Popen(command, shell=True, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    except BaseException:  # Ctrl-C: do not leave the command running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, timed_out, output, time.monotonic() - t0


def restore_check(j: Journal, at: str, check: str, timeout: float | None,
                  scratch_parent: str | None) -> Doc:
    """Restore `at` into a fresh scratch directory, run `check` on it and
    remove the directory whatever happens."""
    scratch = tempfile.mkdtemp(prefix="cdpctl-check-", dir=scratch_parent)
    try:
        result = restore(j, scratch, at=at, audit=False)  # the check is audited as a whole
        command = check.replace("{dir}", shlex.quote(scratch))
        code, timed_out, output, seconds = _run_command(command, scratch, timeout)
    finally:
        _remove_tree(scratch)
    tail, truncated = _tail(output)
    return {"journal": j.path, "at": at, "seq": result.seq, "time": result.to_json()["time"],
            "command": check, "scratch": scratch, "exit_code": code, "timed_out": timed_out,
            "passed": code == 0 and not timed_out, "seconds": round(seconds, 3),
            "output_tail": tail, "output_truncated": truncated, "restore": result.to_json()}


def render_check(doc: Doc) -> Iterator[str]:
    yield (f"restore check of {doc['journal']} at seq {doc['seq']} ({doc['time'] or 'no records'}) "
           f"in {doc['scratch']} (removed)")
    yield f"command: {doc['command']}"
    if doc["timed_out"]:
        outcome = f"killed after {doc['seconds']:.1f} s (--timeout)"
    else:
        outcome = f"the command exited {doc['exit_code']} after {doc['seconds']:.1f} s"
    if doc["output_tail"]:
        yield f"--- {'last lines of ' if doc['output_truncated'] else ''}its output ---"
        yield from doc["output_tail"].splitlines()
        yield "---"
    yield f"{'PASS' if doc['passed'] else 'FAIL'}: {outcome}"
    yield f"audit entry {doc['audit_entry']}"


def run_check(args: argparse.Namespace, out: Output) -> int:
    at = args.at or "latest"
    arguments: Doc = {"at": at, "command": args.check}
    if args.timeout is not None:
        arguments["timeout"] = args.timeout
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        try:
            doc = restore_check(j, at, args.check, args.timeout, args.scratch)
        except BaseException as e:
            # a check that could not run is on record too, then reported as usual
            if not isinstance(e, (SystemExit, UsageError)):
                audit.append(j.path, "restore-check", arguments,
                             {"error": f"{type(e).__name__}: {e}"}, ok=False)
            raise
        entry = audit.append(j.path, "restore-check", arguments,
                             {k: doc[k] for k in ("seq", "exit_code", "timed_out", "passed")},
                             ok=doc["passed"])
    if entry.anchor_error:
        out.warn(f"audit entry {entry.n} could not be anchored in the journal: {entry.anchor_error}")
    doc["audit_entry"] = entry.n
    out.result(doc, render_check)
    return 0 if doc["passed"] else EXIT_CHECK_FAILED
