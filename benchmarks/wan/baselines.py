"""Baselines over the same shaped link: `rsync -z` (a daemon in the DR
namespace, pushed to from the sender namespace) and `zstd -3` of the
changed data (its size, and optionally a plain TCP copy of it through the
link for its link time).

Every transfer is measured the same way as cdpcore's: the wire bytes are
the sender veth's tx_bytes over the run (netlink.Sampler), the link use
is netlink.utilisation() over the same samples. rsync's own `--stats`
("Total bytes sent") is kept next to it: the difference is TCP/IP and
Ethernet framing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Any

from netlink import Link, NetlinkError, Sampler, tcp_copy, utilisation

RSYNC_PORT = 8730
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _listening(link: Link, port: int) -> bool:
    """Whether something listens on port in the DR namespace, read from
    /proc/PID/net/tcp of a process there (no packet crosses the link)."""
    anchor = link._anchors.get("dr")
    if anchor is None:
        raise NetlinkError("the link has no DR anchor process (made by Link.create in this process?)")
    with open(f"/proc/{anchor.pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == _LISTEN and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_listening(link: Link, port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(link, port):
        if proc.poll() is not None:
            raise NetlinkError(f"{what} exited with {proc.returncode} before listening on port {port}")
        if time.monotonic() > deadline:
            raise NetlinkError(f"{what} did not listen on port {port} within {timeout:.0f} s")
        time.sleep(0.05)


_STATS = {
    "sent": re.compile(r"^Total bytes sent: ([\d,]+)", re.M),
    "received": re.compile(r"^Total bytes received: ([\d,]+)", re.M),
    "literal": re.compile(r"^Literal data: ([\d,]+)", re.M),
    "matched": re.compile(r"^Matched data: ([\d,]+)", re.M),
    "files_transferred": re.compile(r"^Number of regular files transferred: ([\d,]+)", re.M),
}
_COMPRESS = re.compile(r"negotiated compress: (\S+)", re.I)


def parse_rsync_stats(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, rx in _STATS.items():
        m = rx.search(text)
        if m:
            out[k] = int(m.group(1).replace(",", ""))
    m = _COMPRESS.search(text)
    out["compress"] = m.group(1) if m else "?"
    return out


def rsync_push(link: Link, src: str, dr_dir: str, compress_choice: str | None = None) -> dict[str, Any]:
    """`rsync -a -z --stats SRC/ rsync://DR/dr/` from the sender namespace
    to an rsync daemon in the DR namespace serving dr_dir (which holds the
    state before the change: the delta algorithm works against it). With
    compress_choice, -z is pinned to that codec (else rsync 3.2
    negotiates zstd)."""
    if shutil.which("rsync") is None:
        raise NetlinkError("rsync not found")
    conf_dir = tempfile.mkdtemp(prefix="cdpwan-rsyncd-")
    conf = os.path.join(conf_dir, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(f"address = {link.dr_ip}\nport = {RSYNC_PORT}\nuse chroot = false\n"
                f"[dr]\n  path = {dr_dir}\n  read only = false\n  uid = root\n  gid = root\n")
    daemon = link.popen("dr", ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--log-file={conf_dir}/log"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(link, RSYNC_PORT, daemon, "rsync --daemon")
        cmd = ["rsync", "-a", "-z", "--stats", "--debug=NSTR"]
        if compress_choice:
            cmd.append(f"--compress-choice={compress_choice}")
        cmd += [src.rstrip("/") + "/", f"rsync://{link.dr_ip}:{RSYNC_PORT}/dr/"]
        with Sampler(link) as smp:
            t0 = time.monotonic()
            p = link.run("tx", cmd, capture_output=True, text=True)
            t1 = time.monotonic()
        if p.returncode != 0:
            raise NetlinkError(f"rsync exited with {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(conf_dir, ignore_errors=True)
    stats = parse_rsync_stats(p.stdout + p.stderr)
    return {"elapsed_s": t1 - t0, **utilisation(smp.samples, link.rate_bit), "rsync_stats": stats}


def zstd_size(paths: list[str], level: int = 3, out: str | None = None) -> int:
    """Size of `zstd -LEVEL` of the given files concatenated in order (the
    CLI, single thread: what an operator would run)."""
    if shutil.which("zstd") is None:
        raise NetlinkError("zstd (the CLI) not found")
    cat = subprocess.Popen(["cat", "--", *paths], stdout=subprocess.PIPE)
    dest = open(out, "wb") if out else None
    try:
        z = subprocess.run(["zstd", f"-{level}", "-q", "-c"], stdin=cat.stdout,
                           stdout=dest if dest else subprocess.PIPE, check=True)
    finally:
        if cat.stdout:
            cat.stdout.close()
        cat.wait()
        if dest:
            dest.close()
    return os.path.getsize(out) if out else len(z.stdout)


def tar_zstd(root: str, names: list[str], out: str, level: int = 3) -> int:
    """`tar -c NAMES | zstd -LEVEL` (a tree's new files as one stream,
    with their names and metadata, as an operator would ship them)."""
    tar = subprocess.Popen(["tar", "-C", root, "-cf", "-", "--", *names], stdout=subprocess.PIPE)
    with open(out, "wb") as f:
        subprocess.run(["zstd", f"-{level}", "-q", "-c"], stdin=tar.stdout, stdout=f, check=True)
    if tar.stdout:
        tar.stdout.close()
    if tar.wait() != 0:
        raise NetlinkError(f"tar of {len(names)} names under {root} failed")
    return os.path.getsize(out)


def zstd_over_link(link: Link, compressed: str) -> dict[str, Any]:
    """The zstd output pushed through the link by a plain TCP copy: its
    wire bytes and link time (the compression time is not included: it
    is the size that is the baseline)."""
    return tcp_copy(link, path=compressed)


def tar_members(root: str) -> list[str]:
    """Every regular file under root, relative, sorted (a tree's listing)."""
    out = []
    for d, _dirs, files in os.walk(root):
        for n in files:
            out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


__all__ = ["rsync_push", "zstd_size", "tar_zstd", "zstd_over_link", "tar_members", "parse_rsync_stats",
           "wait_listening"]
