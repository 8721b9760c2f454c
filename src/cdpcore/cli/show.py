"""cdpctl show JOURNAL SEQ: one record, every field."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from cdpcore.cli.log import NAME_LABEL
from cdpcore.cli.output import (
    Doc,
    Output,
    add_command,
    count,
    fields,
    hexdump,
    mode,
    open_journal,
    text,
)
from cdpcore.format import Kind
from cdpcore.point import format_us

DATA_SHOWN = 256  # payload bytes shown without --full: a WRITE carries up to 16 MiB


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "show", "show one record",
                    "Show every field of the record with sequence number SEQ.")
    p.add_argument("seq", type=count, metavar="SEQ", help="sequence number of the record")
    p.add_argument("--data", action="store_true",
                   help=f"also dump the payload (its first {DATA_SHOWN} bytes)")
    p.add_argument("--full", action="store_true", help="dump the whole payload (implies --data)")
    return p


def render(doc: Doc) -> Iterator[str]:
    kind = Kind[doc["kind"]]
    rows: list[tuple[str, Any]] = [
        ("seq", doc["seq"]),
        ("time", f"{doc['time']} ({doc['ts']} us)"),
        ("kind", doc["kind"]),
        ("path", text(doc["path"])),
        ("file id", doc["file_id"]),
        ("offset", doc["offset"]),
        ("flags", f"0x{doc['flags']:02x}"),
        ("payload", f"{doc['payload_length']} bytes"),
    ]
    if "length" in doc:
        rows.append(("length", doc["length"]))
    if "mode" in doc:
        rows.append(("mode", mode(doc["mode"])))
    if "mtime_us" in doc:
        rows.append(("mtime", format_us(doc["mtime_us"])))
    if "target" in doc:
        rows.append(("target", text(doc["target"])))
    if "name" in doc:
        rows.append((NAME_LABEL.get(kind, "name"), text(doc["name"])))
    yield from fields(rows)
    if doc.get("data_hex"):
        yield ""
        yield from hexdump(bytes.fromhex(doc["data_hex"]))
        if doc["data_truncated"]:
            rest = doc["payload_length"] - len(doc["data_hex"]) // 2
            yield f"... {rest} more bytes (--full shows them)"


def run(args: argparse.Namespace, out: Output) -> int:
    with open_journal(args.journal, out, encrypt_key=args.encrypt_key) as j:
        rec = j.record(args.seq)
    # to_json() leaves out the fields a reader of `log` has no use for;
    # show is where every field of the record is visible.
    doc = rec.to_json()
    doc.update(offset=rec.offset, flags=rec.flags, payload_length=len(rec.data))
    if args.data or args.full:
        shown = rec.data if args.full else rec.data[:DATA_SHOWN]
        doc.update(data_hex=shown.hex(), data_truncated=len(shown) < len(rec.data))
    out.result(doc, render)
    return 0
