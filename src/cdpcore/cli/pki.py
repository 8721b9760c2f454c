"""cdpctl pki: the certificates replication runs on (and end-to-end key files).

    cdpctl pki init DIR --source NAME [--source NAME ...] [--host NAME ...] [--days N] [--force]
    cdpctl pki add DIR --source NAME [...] [--server --host NAME ...] [--days N] [--force]
"""
from __future__ import annotations

import argparse
from typing import Any

from cdpcore.cli.output import Output, UsageError

DEFAULT_DAYS = 825  # = DEFAULT_DAYS (cryptography is imported only when pki runs)
CA_DAYS_FACTOR = 4  # = CA_DAYS_FACTOR


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "pki", help="create the replication CA and certificates",
        description="Create the certificates of replication: a CA, the receiver's (server) "
                    "certificate and one client certificate per source (its CN is the source's "
                    "name in the vault). Keys are EC P-256, written 0600.")
    sub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    for name, help in (("init", "a new CA, the server's certificate and one per source"),
                       ("add", "more certificates signed by the CA already in DIR")):
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("dir", metavar="DIR", help="directory for the files (created by init)")
        q.add_argument("--source", action="append", default=[], metavar="NAME",
                       help="a source's name (repeatable): writes NAME.pem and NAME.key")
        q.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="another DNS name or IP address of the receiver (repeatable; "
                            "localhost, 127.0.0.1 and ::1 are always in)")
        q.add_argument("--days", type=int, default=DEFAULT_DAYS, metavar="N",
                       help=f"validity of the certificates in days (default {DEFAULT_DAYS}; "
                            f"the CA's is {CA_DAYS_FACTOR}x that)")
        q.add_argument("--force", action="store_true", help="overwrite existing files")
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="write one JSON document to stdout (errors included)")
        if name == "add":
            q.add_argument("--server", action="store_true",
                           help="also a new server certificate (with --host names)")
    q = sub.add_parser("key", help="write a new end-to-end encryption key file (ship --encrypt-key)",
                       description="Write 64 random bytes as one hex line, mode 0600. Refuses to "
                                   "overwrite: a lost key makes every replica sealed with it unreadable.")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON document to stdout (errors included)")
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    from cdpcore import pki
    from cdpcore.crypto import write_key_file

    if args.pki_command == "key":
        write_key_file(args.file)
        out.result({"file": args.file}, lambda d: [f"wrote {d['file']} (keep a copy off this machine)"])
        return 0
    try:
        if args.pki_command == "init":
            if not args.source:
                raise ValueError("give at least one --source NAME")
            files = pki.init(args.dir, args.source, hosts=args.host, days=args.days, force=args.force)
        else:
            if not args.source and not args.server:
                raise ValueError("give --source NAME or --server")
            files = pki.issue(args.dir, sources=args.source, server=args.server, hosts=args.host,
                              days=args.days, force=args.force)
    except ValueError as e:
        raise UsageError(str(e)) from None
    doc = {"dir": args.dir, "files": [str(f) for f in files]}
    out.result(doc, lambda d: [f"wrote {f}" for f in d["files"]])
    return 0
