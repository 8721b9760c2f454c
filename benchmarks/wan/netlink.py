"""Netlink: a real, shaped link between two network namespaces, for the
replication benchmarks (issue 5, item 9). Needs root (or CAP_NET_ADMIN and
CAP_SYS_ADMIN), `ip` and `tc` (iproute2).

    python benchmarks/wan/netlink.py verify [--rate 10mbit] [--mib 12]
    python benchmarks/wan/netlink.py run [--rate 10mbit] -- CMD [ARGS...]
    python benchmarks/wan/netlink.py up [--rate 10mbit]     # prints the link as JSON; owned by the caller
    python benchmarks/wan/netlink.py counters NAME           # tx/rx bytes of both ends
    python benchmarks/wan/netlink.py down NAME               # idempotent
    python benchmarks/wan/netlink.py clean                   # links whose owner process is gone

Topology (NAME = cdpwan-PID-XXXX, unique per link: the owner's pid and
random hex, so concurrent runs on one machine never collide)::

    netns NAME-tx                               netns NAME-dr
      veth cwPIDXXXXt 10.77.0.1/30  <======>  veth cwPIDXXXXd 10.77.0.2/30
      tbf RATE (egress)                         tbf RATE (egress)

The addresses are the same for every link: each pair lives only inside its
own two namespaces, so they cannot collide. `run` exports the names and
addresses to CMD (CDP_WAN_TX_NS, CDP_WAN_DR_NS, CDP_WAN_TX_IP,
CDP_WAN_DR_IP, CDP_WAN_TX_IF, CDP_WAN_DR_IF, CDP_WAN_RATE) and removes the
link when CMD ends, also on SIGINT, SIGTERM or SIGHUP.

Why these tbf parameters (see docs/benchmarks.md):

- tbf on the egress of *both* veth ends: each direction is a 10 Mbit/s
  pipe, like a leased line (the ack direction is nearly idle anyway).
- burst = 4 full frames (4 x 1514 B, 4.8 ms at 10 Mbit/s) at least, more
  for faster rates (2 ms of traffic): big enough that the token bucket
  never starves between timer ticks, small enough that no 20 ms window
  carries noticeably more than the rate.
- latency 50 ms (the queue tbf may hold, 62.5 KB at 10 Mbit/s): the buffer
  of a modest WAN router. A larger queue would only add delay (the
  sender's TCP fills whatever queue there is); a much smaller one makes
  TCP back off on local drops and leaves the link idle.
- GSO/TSO off on the veth (gso_max_segs 1): otherwise the kernel hands
  the qdisc and the interface counters 64 KB super-packets whose headers
  are counted once, and tx_bytes under-counts the wire by ~3 %. With it,
  every frame is counted as a 1500-byte Ethernet link would carry it
  (14-byte Ethernet header + IP + TCP + payload), for us and for every
  baseline alike.

The interface counters (`/sys/class/net/IF/statistics/{tx,rx}_bytes`
inside the namespace; the same numbers as /proc/PID/net/dev of any
process in it, which is how `Link.counters()` reads them from outside
without a fork) are the wire bytes of whatever crosses the link.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PREFIX = "cdpwan"
TX_IP, DR_IP = "10.77.0.1", "10.77.0.2"
FRAME = 1514  # an Ethernet frame at MTU 1500, as tx_bytes counts it (no FCS)
DEFAULT_RATE = "10mbit"
DEFAULT_LATENCY_MS = 50
SINK_PORT = 9300
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-([0-9a-f]{{4}})$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*$", re.I)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetlinkError(Exception):
    """A link cannot be set up, used or removed; the message is one line
    that says what and why (the CLI prints it and exits 23, LinkError's
    code in cdpcore.errors)."""


def parse_rate(text: str) -> int:
    """'10mbit' -> 10_000_000 bits/s (tc's decimal units; 'mbps' is refused
    because tc reads it as megabytes)."""
    m = _RATE_RE.match(text)
    if not m:
        raise NetlinkError(f"bad rate {text!r}: expected a number and bit, kbit, mbit or gbit, e.g. '10mbit'")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
    if bits < 8 * FRAME * 10:  # below ~120 kbit/s a single frame takes longer than the queue holds
        raise NetlinkError(f"rate {text!r} is too low: at least {8 * FRAME * 10} bit/s")
    return bits


def tbf_params(rate_bit: int, latency_ms: int = DEFAULT_LATENCY_MS) -> dict[str, int]:
    """The tbf burst (bytes) and latency (ms) for a rate; why: module doc."""
    burst = max(4 * FRAME, rate_bit // 8 * 2 // 1000)
    return {"burst": burst, "latency_ms": latency_ms}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(list(args), capture_output=True, text=True)
    except FileNotFoundError:
        raise NetlinkError(f"{args[0]} not found: install iproute2") from None
    if check and p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise NetlinkError(f"{' '.join(args)}: {msg[-1] if msg else f'exit {p.returncode}'}")
    return p


def namespaces() -> list[str]:
    """Every network namespace name on the machine (`ip netns list`)."""
    out = _ip("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Link:
    """One shaped link. `Link.create()` sets it up; `down()` removes it
    (idempotent); `with shaped_link(...)` does both."""

    name: str
    rate_bit: int
    burst: int
    latency_ms: int
    tx_ns: str = ""
    dr_ns: str = ""
    tx_if: str = ""
    dr_if: str = ""
    tx_ip: str = TX_IP
    dr_ip: str = DR_IP
    _anchors: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        m = _NAME_RE.match(self.name)
        if not m:
            raise NetlinkError(f"bad link name {self.name!r}: expected {PREFIX}-PID-XXXX")
        self.tx_ns, self.dr_ns = f"{self.name}-tx", f"{self.name}-dr"
        # interface names are at most 15 bytes: cw + pid (<= 7 digits) + 4 hex + t/d
        short = f"cw{m.group(1)[-7:]}{m.group(2)}"
        self.tx_if, self.dr_if = f"{short}t", f"{short}d"

    # ---- life cycle ------------------------------------------------------------

    @classmethod
    def create(cls, rate: str = DEFAULT_RATE, latency_ms: int = DEFAULT_LATENCY_MS, owner: int | None = None) -> Link:
        """A new link, named after `owner` (default: this process): `clean`
        removes it once that process is gone."""
        if os.geteuid() != 0:
            raise NetlinkError("setting up network namespaces needs root")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise NetlinkError(f"{tool} not found: install iproute2")
        rate_bit = parse_rate(rate)
        p = tbf_params(rate_bit, latency_ms)
        link = cls(name=f"{PREFIX}-{owner or os.getpid()}-{secrets.token_hex(2)}", rate_bit=rate_bit,
                   burst=p["burst"], latency_ms=p["latency_ms"])
        try:
            link._up()
        except BaseException:
            link.down()
            raise
        return link

    def _up(self) -> None:
        existing = set(namespaces())
        if self.tx_ns in existing or self.dr_ns in existing:
            raise NetlinkError(f"namespace {self.tx_ns} or {self.dr_ns} exists already")
        _ip("ip", "netns", "add", self.tx_ns)
        _ip("ip", "netns", "add", self.dr_ns)
        # created directly inside the namespaces: never visible in the root one
        _ip("ip", "-n", self.tx_ns, "link", "add", self.tx_if, "type", "veth",
            "peer", "name", self.dr_if, "netns", self.dr_ns)
        for ns, ifname, addr in ((self.tx_ns, self.tx_if, self.tx_ip), (self.dr_ns, self.dr_if, self.dr_ip)):
            _ip("ip", "-n", ns, "link", "set", "lo", "up")
            _ip("ip", "-n", ns, "link", "set", ifname, "gso_max_segs", "1", "gso_max_size", str(FRAME))
            _ip("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
            _ip("ip", "-n", ns, "link", "set", ifname, "up")
            _ip("tc", "-n", ns, "qdisc", "add", "dev", ifname, "root", "tbf", "rate", f"{self.rate_bit}bit",
                "burst", str(self.burst), "latency", f"{self.latency_ms}ms")
        # One idle process per namespace, so that counters() reads
        # /proc/PID/net/dev (that namespace's counters) without a fork.
        for side, ns in (("tx", self.tx_ns), ("dr", self.dr_ns)):
            self._anchors[side] = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                                                   stdin=subprocess.DEVNULL)

    def down(self) -> None:
        """Remove both namespaces (and so the veth pair and its qdiscs).
        Safe to call twice, or on a half-built link. Processes still
        running inside get SIGKILL first, so the namespace really goes."""
        for a in self._anchors.values():
            if a.poll() is None:
                a.kill()
            a.wait()
        self._anchors.clear()
        present = set(namespaces())
        for ns in (self.tx_ns, self.dr_ns):
            if ns not in present:
                continue
            for pid in _ip("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("ip", "netns", "del", ns, check=False)
        left = set(namespaces()) & {self.tx_ns, self.dr_ns}
        if left:
            raise NetlinkError(f"could not remove namespace(s) {', '.join(sorted(left))}")

    # ---- use -------------------------------------------------------------------

    def ns(self, side: str) -> str:
        if side not in ("tx", "dr"):
            raise NetlinkError(f"side must be 'tx' (sender) or 'dr' (DR site), not {side!r}")
        return self.tx_ns if side == "tx" else self.dr_ns

    def argv(self, side: str, cmd: Sequence[str]) -> list[str]:
        """cmd run inside a side's namespace. `ip netns exec` execs (no
        fork): the Popen's pid is the command's own, so its rusage and
        /proc/PID/stat are the command's."""
        return ["ip", "netns", "exec", self.ns(side), *cmd]

    def popen(self, side: str, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.argv(side, cmd), **kw)

    def run(self, side: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.argv(side, cmd), **kw)

    def counters(self) -> dict[str, int]:
        """tx/rx bytes and packets of both veth ends:
        {'tx_tx_bytes', 'tx_rx_bytes', 'dr_tx_bytes', ...}."""
        out: dict[str, int] = {}
        for side, ifname in (("tx", self.tx_if), ("dr", self.dr_if)):
            anchor = self._anchors.get(side)
            if anchor is not None and anchor.poll() is None:
                with open(f"/proc/{anchor.pid}/net/dev") as f:
                    text = f.read()
            else:
                text = _ip("ip", "netns", "exec", self.ns(side), "cat", "/proc/net/dev").stdout
            out.update({f"{side}_{k}": v for k, v in parse_net_dev(text, ifname).items()})
        return out

    def describe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "rate_bit", "burst", "latency_ms", "tx_ns", "dr_ns",
                                              "tx_if", "dr_if", "tx_ip", "dr_ip")}

    def env(self) -> dict[str, str]:
        return {"CDP_WAN_NAME": self.name, "CDP_WAN_TX_NS": self.tx_ns, "CDP_WAN_DR_NS": self.dr_ns,
                "CDP_WAN_TX_IF": self.tx_if, "CDP_WAN_DR_IF": self.dr_if, "CDP_WAN_TX_IP": self.tx_ip,
                "CDP_WAN_DR_IP": self.dr_ip, "CDP_WAN_RATE": f"{self.rate_bit}bit"}

    def qdiscs(self) -> str:
        return "\n".join(_ip("tc", "-n", ns, "qdisc", "show", "dev", ifname).stdout.strip()
                         for ns, ifname in ((self.tx_ns, self.tx_if), (self.dr_ns, self.dr_if)))

    @classmethod
    def attach(cls, name: str) -> Link:
        """The Link object of an existing link made by another process
        (for `counters` and `down`); the tbf figures are not read back."""
        link = cls(name=name, rate_bit=0, burst=0, latency_ms=0)
        return link


def parse_net_dev(text: str, ifname: str) -> dict[str, int]:
    """The counters of one interface from /proc/net/dev text."""
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            f = rest.split()
            if len(f) < 16:
                break
            return {"rx_bytes": int(f[0]), "rx_packets": int(f[1]), "tx_bytes": int(f[8]),
                    "tx_packets": int(f[9])}
    raise NetlinkError(f"interface {ifname} not found in /proc/net/dev (is the link up?)")


def stale_links() -> list[str]:
    """Names of links whose creating process is gone (left by a SIGKILLed run)."""
    names = set()
    for ns in namespaces():
        base = ns.rsplit("-", 1)[0]
        m = _NAME_RE.match(base)
        if m and not _pid_alive(int(m.group(1))):
            names.add(base)
    return sorted(names)


@contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit (SIGINT already raises
    KeyboardInterrupt), so `finally` blocks tear the link down."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def shaped_link(rate: str = DEFAULT_RATE, latency_ms: int = DEFAULT_LATENCY_MS) -> Iterator[Link]:
    """A link for the duration of the block; removed however the block ends."""
    with _signals_exit():
        link = Link.create(rate, latency_ms)
        try:
            yield link
        finally:
            link.down()


# ---- a plain TCP transfer through the link (the reference, and a baseline's carrier) ----


class Sampler:
    """Reads a link's counters every `period` seconds in a thread, for the
    link-utilisation figure: samples are (monotonic time, counters)."""

    def __init__(self, link: Link, period: float = 0.02) -> None:
        self.link, self.period = link, period
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.link.counters()))
            nxt += self.period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.link.counters()))


def sink(host: str, port: int, ready_fd: int | None = None) -> None:
    """Accept one connection, read to EOF, answer with the byte count."""
    with socket.create_server((host, port), reuse_port=False) as srv:
        if ready_fd is not None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)
        conn, _ = srv.accept()
        with conn:
            n = 0
            while b := conn.recv(1 << 16):
                n += len(b)
            conn.sendall(f"{n}\n".encode())


def source(host: str, port: int, path: str | None, nbytes: int) -> int:
    """Send a file (or nbytes of incompressible bytes) and wait for the
    sink's count: returns it (equal to what was sent, else an error)."""
    with socket.create_connection((host, port), timeout=600) as s:
        sent = 0
        if path is not None:
            with open(path, "rb") as f:
                sent = s.sendfile(f)
        else:
            block = os.urandom(1 << 16)
            while sent < nbytes:
                sent += s.send(block[: min(len(block), nbytes - sent)])
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while b := s.recv(64):
            reply += b
    got = int(reply.decode().strip() or "-1")
    if got != sent:
        raise NetlinkError(f"TCP copy through the link: sent {sent} bytes, the sink got {got}")
    return sent


def tcp_copy(link: Link, path: str | None = None, nbytes: int = 0, port: int = SINK_PORT) -> dict[str, Any]:
    """A plain TCP transfer from the sender side to the DR side (a file, or
    nbytes of random bytes), timed, with the wire bytes and the link use
    from sampled counters."""
    here = os.path.abspath(__file__)
    r, w = os.pipe()
    srv = link.popen("dr", [sys.executable, here, "_sink", link.dr_ip, str(port), str(w)], pass_fds=(w,))
    os.close(w)
    try:
        if os.read(r, 1) != b"r":
            raise NetlinkError("the TCP sink in the DR namespace did not start")
        os.close(r)
        with Sampler(link) as smp:
            t0 = time.monotonic()
            p = link.run("tx", [sys.executable, here, "_source", link.dr_ip, str(port), path or "-",
                                str(nbytes)], capture_output=True, text=True)
            t1 = time.monotonic()
        if p.returncode != 0:
            raise NetlinkError(f"TCP copy failed: {p.stderr.strip().splitlines()[-1:]}")
        if srv.wait(timeout=30) != 0:
            raise NetlinkError("the TCP sink failed")
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    payload = int(p.stdout.strip())
    u = utilisation(smp.samples, link.rate_bit)
    return {"payload_bytes": payload, "elapsed_s": t1 - t0, **u,
            "goodput_mbit": payload * 8 / (t1 - t0) / 1e6}


def utilisation(samples: Sequence[tuple[float, dict[str, int]]], rate_bit: int) -> dict[str, Any]:
    """Wire bytes in each direction over the samples, and link use in the
    sender -> DR direction while it was busy: bytes / (rate x span), where
    the span runs from the last sample before the first byte to the first
    sample after the last one (conservative by up to two sample periods).
    `backlog_s` is that span."""
    if len(samples) < 2:
        raise NetlinkError("need at least two counter samples")
    first, last = samples[0][1], samples[-1][1]
    wire_fwd = last["tx_tx_bytes"] - first["tx_tx_bytes"]
    wire_back = last["dr_tx_bytes"] - first["dr_tx_bytes"]
    start = end = None
    for (ta, ca), (tb, cb) in zip(samples, samples[1:]):
        if cb["tx_tx_bytes"] > ca["tx_tx_bytes"]:
            if start is None:
                start = ta
            end = tb
    span = (end - start) if start is not None and end is not None else 0.0
    use = wire_fwd * 8 / (rate_bit * span) if span > 0 and rate_bit else float("nan")
    return {"wire_bytes": wire_fwd, "wire_bytes_back": wire_back,
            "packets": last["tx_tx_packets"] - first["tx_tx_packets"],
            "backlog_s": span, "link_use": use, "backlog_start": start, "backlog_end": end}


# ---- CLI ---------------------------------------------------------------------------


def _verify(rate: str, mib: int) -> dict[str, Any]:
    with shaped_link(rate) as link:
        res = tcp_copy(link, nbytes=mib << 20)
        res["link"] = link.describe()
        res["qdiscs"] = link.qdiscs()
        res["counters"] = link.counters()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("up", "run", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--rate", default=DEFAULT_RATE, help="e.g. 10mbit (default)")
        p.add_argument("--latency-ms", type=int, default=DEFAULT_LATENCY_MS, help="tbf queue, in ms of traffic")
        if name == "run":
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
        if name == "verify":
            p.add_argument("--mib", type=int, default=12, help="MiB to send (default 12: ~10 s at 10 Mbit/s)")
    for name in ("down", "counters"):
        sub.add_parser(name).add_argument("name", help="the link's name (cdpwan-PID-XXXX)")
    sub.add_parser("clean")
    sub.add_parser("list")
    hidden = sub.add_parser("_sink")
    hidden.add_argument("host"), hidden.add_argument("port", type=int), hidden.add_argument("fd", type=int)
    hidden = sub.add_parser("_source")
    hidden.add_argument("host"), hidden.add_argument("port", type=int), hidden.add_argument("path")
    hidden.add_argument("nbytes", type=int)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "_sink":
            sink(a.host, a.port, a.fd)
        elif a.cmd == "_source":
            print(source(a.host, a.port, None if a.path == "-" else a.path, a.nbytes))
        elif a.cmd == "verify":
            if a.mib < 1:
                raise NetlinkError("--mib must be at least 1")
            res = _verify(a.rate, a.mib)
            print(json.dumps(res, indent=1))
            print(f"verify: {res['payload_bytes']:,} bytes in {res['elapsed_s']:.2f} s: goodput "
                  f"{res['goodput_mbit']:.2f} Mbit/s; wire {res['wire_bytes']:,} bytes "
                  f"({res['packets']:,} frames), link use {res['link_use']:.1%}", file=sys.stderr)
        elif a.cmd == "up":
            # owned by the calling shell: `clean` leaves it alone while that shell lives
            link = Link.create(a.rate, a.latency_ms, owner=os.getppid())
            # the anchors would die with us: counters of a link made by `up` go through ip netns exec
            for anc in link._anchors.values():
                anc.kill()
                anc.wait()
            link._anchors.clear()
            print(json.dumps(link.describe()))
        elif a.cmd == "run":
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if not cmd:
                raise NetlinkError("run: no command given (netlink.py run -- CMD [ARGS...])")
            with shaped_link(a.rate, a.latency_ms) as link:
                return subprocess.run(cmd, env={**os.environ, **link.env()}).returncode
        elif a.cmd == "down":
            Link.attach(a.name).down()
        elif a.cmd == "counters":
            print(json.dumps(Link.attach(a.name).counters()))
        elif a.cmd == "clean":
            for name in stale_links():
                Link.attach(name).down()
                print(f"removed {name}")
        elif a.cmd == "list":
            for ns in namespaces():
                if ns.startswith(PREFIX + "-"):
                    print(ns)
    except NetlinkError as e:
        print(f"netlink: {e}", file=sys.stderr)
        return 23
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
