"""cdpctl protect JOURNAL [--no-baseline] [--no-resync] [--json] -- CMD [ARGS...]:
run CMD with every change under the journal's root captured."""
from __future__ import annotations

import argparse
import signal
from collections.abc import Iterator
from typing import Any

from cdpcore.capture import protect
from cdpcore.cli.output import Doc, Output, UsageError, add_command, plural, text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = add_command(subparsers, "protect", "run a program with its writes captured",
                    "Run CMD (and every process it starts) with the capture library preloaded: "
                    "every change under the journal's root is journaled. A journal without a "
                    "base gets one while CMD runs (an online baseline). When CMD exits, files "
                    "marked dirty are reported and the root is resynced. The exit code is CMD's "
                    "own (128+N when signal N killed it). See docs/capture.md.")
    p.add_argument("--no-baseline", action="store_true", help="do not take a baseline even if the journal has none")
    p.add_argument("--no-resync", action="store_true", help="do not resync the root when CMD exits")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the program to run")
    return p


def render(doc: Doc) -> Iterator[str]:
    yield (f"protect: {text(doc['argv'][0])} exited with {doc['returncode']}; "
           f"journaled seq {doc['first_seq']}..{doc['last_seq']}")
    if doc["baseline"]:
        b = doc["baseline"]
        yield (f"  baseline {b['name']}: {plural(b['files'], 'file')}, restore is complete from "
               f"seq {b['complete_seq']}")
    for d in doc["dirty"]:
        yield f"  dirty: {text(d)}"
    r = doc["resync"]
    if r and r["seq"]:
        yield (f"  resync journaled {len(r['changed'])} changed, {len(r['created'])} created, "
               f"{len(r['removed'])} removed (seq {r['seq']})")


def run(args: argparse.Namespace, out: Output) -> int:
    argv = list(args.argv)
    # argparse's REMAINDER takes every word after JOURNAL, the options that
    # the usage puts between JOURNAL and "--" too: they are read here
    options = {"--no-baseline": "no_baseline", "--no-resync": "no_resync"}
    while argv and argv[0] in (*options, "--json"):
        word = argv.pop(0)
        if word == "--json":
            out.json_mode = True
        else:
            setattr(args, options[word], True)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("protect needs a program to run: cdpctl protect JOURNAL -- CMD [ARGS...]")
    prot = protect(args.journal, argv, baseline=not args.no_baseline, resync=not args.no_resync)
    if prot.static_warning:
        out.warn(prot.static_warning)
    res = prot.wait()
    if res.dirty:
        out.warn(f"{plural(len(res.dirty), 'file')} marked dirty during the run (capture could not "
                 "see every change)" + ("; resynced" if res.resync is not None else
                                         ": run `cdpctl resync`"))
    if res.checkpoint_error:
        out.warn(f"could not save restore checkpoints ({res.checkpoint_error}); restores stay correct, "
                 "only slower: run `cdpctl checkpoint`")
    out.result({"journal": args.journal, "argv": argv, **res.to_json()}, render)
    rc = res.returncode
    if rc < 0:
        return 128 + (-rc if -rc in signal.valid_signals() else 0)
    return rc
