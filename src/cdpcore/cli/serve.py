"""cdpctl serve --vault DIR --listen HOST:PORT --cert --key --ca: the DR
site's receiver (docs/replication.md, "Transport")."""
from __future__ import annotations

import argparse
import signal
from typing import Any

from cdpcore.cli.output import Output, UsageError


def _domain(text: str) -> tuple[str, list[str]]:
    name, sep, members = text.partition("=")
    srcs = [m for m in members.split(",") if m]
    if not sep or not name or not srcs:
        raise argparse.ArgumentTypeError(f"invalid domain {text!r}: expected NAME=SOURCE,SOURCE")
    from cdpcore.vault.replica import valid_name

    for word in (name, *srcs):
        if not valid_name(word) or word.startswith("_"):
            raise argparse.ArgumentTypeError(f"invalid domain {text!r}: {word!r} is not a valid name "
                                             "([A-Za-z0-9._-]{1,64}, not . or .., not starting with _)")
    return name, srcs


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="receive replication into a vault (the DR site)",
        description="Listen for `cdpctl ship` connections (mutual TLS 1.3) and keep one replica "
                    "journal per source in the vault (created if DIR is missing or empty). Runs until "
                    "SIGINT/SIGTERM. One line per connection event on stderr.")
    p.add_argument("--vault", required=True, metavar="DIR", help="the vault directory")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to listen on (port 0: any)")
    p.add_argument("--cert", required=True, metavar="FILE", help="the server's certificate (PEM)")
    p.add_argument("--key", required=True, metavar="FILE", help="the server's private key (PEM)")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA that signs the sources' certificates")
    p.add_argument("--revoked", metavar="FILE", help="revoked certificate serials (hex, one a line)")
    p.add_argument("--domain", action="append", default=[], type=_domain, metavar="NAME=SRC,SRC",
                   help="a dedupe domain and the sources allowed in it (repeatable)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON document to stdout at exit (errors included)")
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    # imported here: every other cdpctl command would pay for trio and TLS at start
    import trio

    from cdpcore.transport import tls
    from cdpcore.transport.errors import first_cause
    from cdpcore.transport.server import Server, ServerConfig, parse_listen
    from cdpcore.vault import Vault

    try:
        host, port = parse_listen(args.listen)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = ServerConfig(tls.server_context(args.cert, args.key, args.ca), tls.load_revoked(args.revoked))
    domains: dict[str, list[str]] = {}
    for name, members in args.domain:
        domains.setdefault(name, []).extend(members)
    vault = Vault(args.vault, create=True, domains=domains)
    server = Server(vault, config)

    async def main() -> str:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, host, port)
                async for signum in signals:
                    server.log(f"{signal.Signals(signum).name}: shutting down")
                    nursery.cancel_scope.cancel()
                    return signal.Signals(signum).name
        return "stopped"

    try:
        try:
            why = trio.run(main)
        except BaseExceptionGroup as eg:  # the nursery's: report the one error that ended it
            raise first_cause(eg) from None
    except OSError as e:  # cannot bind: say which address
        raise OSError(e.errno, f"cannot listen on {args.listen}: {e.strerror}") from None
    finally:
        vault.close()
    out.result({"vault": args.vault, "listen": args.listen, "stopped_by": why,
                "connections": server.connections},
               lambda d: [f"serve: stopped by {d['stopped_by']} after {d['connections']} connection(s)"])
    return 0
