"""cdpctl ship JOURNAL --to HOST:PORT --cert --key --ca: replicate a journal
to a vault (docs/replication.md, "Transport")."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from cdpcore.cli.output import Output, UsageError, text

# trio, cryptography and the transport are imported by run(): every other
# cdpctl command would otherwise pay for them at start.
DEFAULT_CPU_LIMIT = 0.25  # = transport.shipper.DEFAULT_CPU_LIMIT (tests/test_replication_cli.py checks)
DEFAULT_GIVE_UP = 300.0  # = transport.shipper.DEFAULT_GIVE_UP (tests/test_replication_cli.py checks)


def _rate(s: str) -> float | None:
    from cdpcore.transport.rate import parse_rate

    try:
        return parse_rate(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cpu(s: str) -> float | None:
    """--cpu-limit: percent of one core (25, 25%, 150% for 1.5 cores) or
    unlimited; the fraction of a core, None for unlimited."""
    t = s.strip().lower()
    if t in ("unlimited", "none"):
        return None
    try:
        v = float(t[:-1] if t.endswith("%") else t)
    except ValueError:
        v = -1
    if not 0 < v <= 6400:
        raise argparse.ArgumentTypeError(f"expected a percentage of one core (e.g. 25, 150%) or 'unlimited', "
                                         f"got {s!r}")
    return v / 100


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {s!r}")
    return v


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ship", help="replicate a journal to a vault (the sending side)",
        description="Send what the vault lacks of JOURNAL over mutual TLS 1.3, resuming from the "
                    "vault's durable position after any disconnect. Without --follow, exit 0 once "
                    "everything is acknowledged; with --follow, keep shipping new records until "
                    "SIGINT/SIGTERM. Progress goes to JOURNAL/replication.json (cdpctl status).")
    p.add_argument("journal", metavar="JOURNAL", help="path of the journal directory")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the receiver (cdpctl serve)")
    p.add_argument("--cert", required=True, metavar="FILE", help="this source's certificate (its CN names the source)")
    p.add_argument("--key", required=True, metavar="FILE", help="this source's private key")
    p.add_argument("--ca", required=True, metavar="FILE", help="CA that signs the server's certificate")
    p.add_argument("--server-name", metavar="NAME",
                   help="the name the server's certificate must carry (default: --to's host); for a DR "
                        "site reached by an address its certificate does not list")
    p.add_argument("--rate", type=_rate, default=None, metavar="RATE",
                   help="cap the sending rate: 10mbit, 500kbit, 1.5MB, 2MiB (per second; default unlimited)")
    p.add_argument("--cpu-limit", type=_cpu, default=DEFAULT_CPU_LIMIT, metavar="PERCENT",
                   help=f"cap the sender's CPU at this percentage of one core, and choose the compression "
                        f"level within it (default {DEFAULT_CPU_LIMIT * 100:g}; 'unlimited' to catch up as "
                        f"fast as the CPU allows)")
    p.add_argument("--follow", action="store_true", help="keep shipping new records until SIGINT/SIGTERM")
    p.add_argument("--encrypt-key", metavar="FILE",
                   help="end-to-end encryption key file (cdpctl pki key): the vault stores ciphertext only")
    p.add_argument("--dedupe-domain", metavar="NAME", help="share chunk dedupe with other sources of this domain")
    p.add_argument("--give-up", type=_seconds, default=DEFAULT_GIVE_UP, metavar="SECONDS",
                   help=f"without --follow: fail (exit 23) after this long without progress "
                        f"(default {DEFAULT_GIVE_UP:g})")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="write one JSON document to stdout (errors included)")
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    import trio

    from cdpcore.crypto import load_key_file
    from cdpcore.transport import tls
    from cdpcore.transport.errors import first_cause
    from cdpcore.transport.rate import format_rate
    from cdpcore.transport.server import parse_listen
    from cdpcore.transport.shipper import Shipper

    try:
        host, port = parse_listen(args.to)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if port == 0:
        raise UsageError(f"invalid address {args.to!r}: port 0 names no receiver")
    if args.server_name is not None and not args.server_name.strip():
        raise UsageError("--server-name must not be empty")
    if args.dedupe_domain is not None and args.encrypt_key is not None:
        raise UsageError("--dedupe-domain and --encrypt-key exclude each other (encrypted chunk ids "
                         "are keyed with the source's own key)")
    keys = load_key_file(args.encrypt_key) if args.encrypt_key else None
    ctx = tls.client_context(args.cert, args.key, args.ca)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"ship: {message}", file=sys.stderr, flush=True)

    shipper = Shipper(args.journal, host, port, ctx, rate=args.rate, follow=args.follow, keys=keys,
                      domain=args.dedupe_domain, give_up=args.give_up, log=log, server_name=args.server_name,
                      cpu_limit=args.cpu_limit)
    if args.rate is not None:
        log(f"rate capped at {format_rate(args.rate)}")

    async def main() -> Any:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for signum in signals:
                        if shipper.stopping:  # a second signal: stop now
                            nursery.cancel_scope.cancel()
                            return
                        log(f"{signal.Signals(signum).name}: finishing (acks outstanding, then bye)")
                        shipper.stop()

                nursery.start_soon(on_signal)
                result = await shipper.run()
                nursery.cancel_scope.cancel()
                return result

    try:
        result = trio.run(main)
    except BaseExceptionGroup as eg:  # the nursery's: report the one error that ended it
        raise first_cause(eg) from None
    if result is None:
        raise KeyboardInterrupt
    doc = {"journal": args.journal, "to": args.to, "state": result.state, "acked_seq": result.acked_seq,
           "wire_bytes": result.wire_bytes, "raw_bytes": result.raw_bytes, "connections": result.connections}
    out.result(doc, lambda d: [f"ship: {d['state']}: acknowledged up to seq {d['acked_seq']} by "
                               f"{text(d['to'])}; {d['raw_bytes']} journal bytes as {d['wire_bytes']} "
                               f"wire bytes over {d['connections']} connection(s)"])
    return 0
