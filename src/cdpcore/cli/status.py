"""cdpctl status JOURNAL | --vault DIR: replication lag (the live RPO),
throughput, compression and dedupe, connection state."""
from __future__ import annotations

import argparse
from typing import Any

from cdpcore.cli.output import Doc, Output, UsageError, fields, size, text
from cdpcore.replication import replication_status, vault_status


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status", help="replication lag, throughput and ratios (sender or vault side)",
        description="The sender's side (JOURNAL: what `ship` acknowledged, lag recomputed against "
                    "the journal now) or the receiver's (--vault DIR: one entry per source).")
    p.add_argument("journal", metavar="JOURNAL", nargs="?", help="path of the journal directory")
    p.add_argument("--vault", metavar="DIR", help="report on a vault instead")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON document to stdout (errors included)")
    return p


def _seconds(v: object) -> str:
    return "-" if v is None else f"{float(v):.1f} s"  # type: ignore[arg-type]


def _rate(v: object) -> str:
    return "-" if not v else f"{float(v) * 8 / 1e6:.2f} Mbit/s"  # type: ignore[arg-type]


def _ratio(v: object) -> str:
    return "-" if v is None else f"{v}x"


def render_sender(d: Doc) -> list[str]:
    return list(fields([
        ("journal", text(d["journal"])), ("target", text(d.get("target"))),
        ("state", f"{d['state']}{' (running)' if d.get('running') else ''}"),
        ("acknowledged", f"seq {d['acked_seq']} of {d['last_seq']}" +
         (f" ({d['acked_time']})" if d.get("acked_time") else "")),
        ("lag", f"{_seconds(d['lag_seconds'])}, " + ("-" if d["lag_bytes"] is None else size(d["lag_bytes"]))),
        ("throughput", _rate(d.get("throughput"))),
        ("wire / raw", f"{d.get('wire_bytes', 0)} / {d.get('raw_bytes', 0)} bytes "
                       f"(compression {_ratio(d.get('compression_ratio'))})"),
        ("dedupe", f"{d.get('dedupe_hits') or 0} chunks, {d.get('dedupe_bytes') or 0} bytes"),
        ("level", f"{d.get('codec') or '-'} {d.get('level') if d.get('level') is not None else ''}".strip()),
        ("last error", text(d.get("last_error"))),
    ]))


def render_vault(d: Doc) -> list[str]:
    lines = [f"vault {text(d['vault'])}: {len(d['sources'])} source(s)"]
    for s in d["sources"]:
        lines.append("")
        lines += fields([
            ("source", text(s["source"])), ("state", s["state"]), ("peer", text(s.get("peer"))),
            ("holds", f"seq {s['last_seq']} ({s.get('last_time') or '-'})" if s.get("last_seq") is not None else "-"),
            ("newest record age", _seconds(s.get("behind_seconds"))),
            ("throughput", _rate(s.get("throughput"))),
            ("wire / raw", f"{s['wire_bytes']} / {s['raw_bytes']} bytes "
                           f"(compression {_ratio(s.get('compression_ratio'))})"),
            ("dedupe hits", str(s.get("dedupe_hits") or 0)),
            ("last error", text(s.get("last_error"))),
        ])
    return lines


def run(args: argparse.Namespace, out: Output) -> int:
    if (args.journal is None) == (args.vault is None):
        raise UsageError("give either JOURNAL or --vault DIR")
    if args.vault is not None:
        out.result(vault_status(args.vault), render_vault)
    else:
        out.result(replication_status(args.journal), render_sender)
    return 0
