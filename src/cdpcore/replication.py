"""replication status: lag, throughput and ratios, for both ends.

The loops in `transport/` write small JSON state files; this module reads
them (and, on the sender's side, the journal itself, so that the lag is
live even when `ship` is not running: a stopped sender is the worst RPO).

- Sender: ``JOURNAL/replication.json``, written by `ship` at most once a
  second and at exit (`write_state`).
- Receiver: ``VAULT/NAME/state.json``, written by `serve` at most once a
  second per connection and when it ends.

Lag in seconds = now - timestamp of the oldest record the vault has not
acknowledged (0 when nothing is pending); lag in bytes = segment bytes not
acknowledged. Both are the live recovery point objective.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cdpcore.errors import CdpError, VaultError
from cdpcore.format import segment_name
from cdpcore.journal import Journal

SENDER_STATE = "replication.json"
RECEIVER_STATE = "state.json"
STATE_VERSION = 1


def now_us() -> int:
    return time.time_ns() // 1000


def write_state(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Replace a state file atomically (temp + rename). No fsync: these are
    statistics, rewritten every second; the durable truth is the vault's."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": STATE_VERSION, **doc}, indent=1, sort_keys=True))
    os.replace(tmp, p)


def read_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A state file's document; None if there is none. A damaged one (a crash
    cannot tear it, but a person can edit it) counts as none."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _segment_sizes(journal_path: str) -> dict[int, int]:
    sizes = {}
    segdir = os.path.join(journal_path, "segments")
    for name in os.listdir(segdir):
        if name.endswith(".seg") and len(name) == 20:
            try:
                n = int(name[:16], 16)
            except ValueError:
                continue
            if segment_name(n) == name:
                sizes[n] = os.stat(os.path.join(segdir, name)).st_size
    return sizes


def replication_status(journal_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sender's view: what `ship` last wrote, with the lag recomputed
    against the journal as it is now."""
    path = os.fspath(journal_path)
    with Journal.open(path, readonly=True) as j:
        info = j.info()
        state = read_state(os.path.join(path, SENDER_STATE))
        doc: dict[str, Any] = {"journal": path, "uuid": info["uuid"], "last_seq": info["last_seq"],
                               "last_time": info["last_time"]}
        if state is None:
            doc.update(state="never", target=None, acked_seq=0, lag_seconds=None, lag_bytes=None)
            return doc
        acked_seq = int(state.get("acked_seq") or 0)
        acked_sizes = {int(k): int(v) for k, v in (state.get("acked_segments") or {}).items()}
        lag_seconds = 0.0
        if acked_seq < info["last_seq"]:
            try:
                oldest = next(j.records(since=f"seq:{max(acked_seq, j.first_seq - 1)}"))
                lag_seconds = max(0.0, (now_us() - oldest.ts) / 1e6)
            except (StopIteration, CdpError):
                lag_seconds = None  # type: ignore[assignment]
        sizes = _segment_sizes(path)
        lag_bytes = sum(max(0, size - acked_sizes.get(n, 0)) for n, size in sizes.items())
    wire, raw = int(state.get("wire_bytes") or 0), int(state.get("raw_bytes") or 0)
    doc.update({k: state.get(k) for k in (
        "target", "source", "state", "acked_time", "last_error", "level", "codec", "throughput",
        "dedupe_hits", "dedupe_bytes", "base_hits", "base_bytes", "connections", "pid", "updated")})
    doc.update(acked_seq=acked_seq, lag_seconds=lag_seconds, lag_bytes=lag_bytes,
               wire_bytes=wire, raw_bytes=raw,
               compression_ratio=round(raw / wire, 3) if wire else None,
               running=_alive(state.get("pid")) and state.get("state") not in ("stopped", "failed"))
    return doc


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def vault_status(vault_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The receiver's view: one entry per source directory in the vault."""
    path = os.fspath(vault_path)
    if not os.path.isdir(path):
        raise VaultError(f"{path}: no such vault directory")
    if not os.path.isfile(os.path.join(path, "vault.json")):  # = vault.VAULT_META (no import: no cycle)
        raise VaultError(f"{path}: not a vault (no vault.json)")
    sources = []
    for name in sorted(os.listdir(path)):
        d = os.path.join(path, name)
        if name.startswith(("_", ".")) or not os.path.isdir(d):
            continue
        state = read_state(os.path.join(d, RECEIVER_STATE)) or {}
        wire, raw = int(state.get("wire_bytes") or 0), int(state.get("raw_bytes") or 0)
        last_ts = state.get("last_ts")
        sources.append({
            "source": name,
            "state": state.get("state", "unknown"),
            "peer": state.get("peer"),
            "connected_since": state.get("connected_since"),
            "last_seq": state.get("last_seq"),
            "last_time": state.get("last_time"),
            # how old the newest record the vault holds is: an upper bound of
            # the source's RPO when the source keeps writing
            "behind_seconds": round(max(0.0, (now_us() - last_ts) / 1e6), 3) if isinstance(last_ts, int) else None,
            "acks": state.get("acks"), "wire_bytes": wire, "raw_bytes": raw,
            "compression_ratio": round(raw / wire, 3) if wire else None,
            "dedupe_hits": state.get("dedupe_hits"), "throughput": state.get("throughput"),
            "last_error": state.get("last_error"), "updated": state.get("updated"),
        })
    return {"vault": path, "sources": sources}
