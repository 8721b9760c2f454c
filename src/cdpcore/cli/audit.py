"""cdpctl audit JOURNAL: list the audit trail; --verify checks it (exit 1 if broken)."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore import audit
from cdpcore.cli.output import Doc, Output, add_command, open_journal, plural, text

EXIT_BROKEN = 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "audit", "list or verify the audit trail",
                    "List the journal's audit log (who restored, rolled back, pruned, bookmarked "
                    "or checked what, and when). --verify checks its hash chain against the "
                    "anchors in the journal: exit 0 when intact, 1 when broken.")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--verify", action="store_true",
                      help="check the chain and the journal's anchors; exit 1 when broken")
    what.add_argument("--anchor", action="store_true",
                      help="anchor the newest entry in the journal (opens it for writing)")
    return p


MAX_VALUE = 60  # characters of one value in the listing; --json has everything


def shorten(v: str) -> str:
    return v if len(v) <= MAX_VALUE else v[: MAX_VALUE - 3] + "..."


def summary(d: dict[str, Any]) -> str:
    """key=value pairs of an entry's arguments or result, on one line; long
    values (a rollback's list of files) are cut."""
    return "  ".join(f"{k}={shorten(text(v if isinstance(v, str) else audit.canonical(v).decode()))}"
                     for k, v in d.items())


def entry_line(e: audit.Entry) -> str:
    who = f"{e.user}@{e.host}"
    if "sudo_user" in e.extra:
        who += f" (sudo by {e.extra['sudo_user']})"
    cells = [f"{e.n:>6}", e.to_json()["time"], text(who), f"{e.action:<13}",
             "ok    " if e.ok else "FAILED", summary(e.arguments)]
    if e.result:
        cells.append("-> " + summary(e.result))
    return "  ".join(cells).rstrip()


def render_verify(doc: Doc) -> Iterator[str]:
    n = doc["entries"]
    anchored = (f"anchored through entry {doc['anchored_through']}" if doc["anchored_through"]
                else "not anchored")
    yield (f"{doc['path']}: {n} {'entry' if n == 1 else 'entries'}, {anchored} "
           f"({plural(doc['anchors'], 'anchor')} in the journal)")
    for p in doc["problems"]:
        yield str(audit.AuditProblem(**p))
    broken = [p for p in doc["problems"] if p["severity"] == "broken"]
    if not broken:
        yield "OK"
    else:
        first = broken[0]
        where = f"entry {first['entry']}" if first["entry"] is not None else f"line {first['line']}"
        yield f"BROKEN: {plural(len(broken), 'problem')}, the first at {where}"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        log = audit.AuditLog(j)
        if args.verify:
            report = log.verify()
            out.result(report.to_json(), render_verify)
            return 0 if report.ok else EXIT_BROKEN
        if args.anchor:
            done = audit.anchor(j.path)
            doc: Doc = {"path": log.path, "entry": done[0] if done else None,
                        "seq": done[1] if done else None}
            out.result(doc, lambda d: [f"anchored entry {d['entry']} at seq {d['seq']}"
                                       if d["entry"] else "the audit log is empty: nothing to anchor"])
            return 0
        out.stream("entries", log.entries(), audit.Entry.to_json, entry_line)
    return 0
