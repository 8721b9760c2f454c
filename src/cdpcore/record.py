"""Record: one decoded journal entry, immutable."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cdpcore._native import INT64_MIN
from cdpcore.format import (
    DIRTY_FIXED,
    NO_MODE,
    SETATTR_FIXED,
    Kind,
    decode_path,
    split_pair,
)
from cdpcore.point import format_us, us_to_datetime


@dataclass(frozen=True, slots=True)
class Record:
    """A journal record. `path` is the file's path at the time of the record:
    for namespace records the path they name, for data records the path the
    file id was bound to then (None if the file had been unlinked)."""

    seq: int
    ts: int
    kind: Kind
    file_id: int
    offset: int
    data: bytes
    flags: int = 0
    path: str | None = None

    @property
    def time(self) -> datetime:
        return us_to_datetime(self.ts)

    @property
    def length(self) -> int:
        """Bytes written (WRITE), new size (TRUNCATE), dirty range (DIRTY)."""
        if self.kind == Kind.TRUNCATE:
            return self.offset
        if self.kind == Kind.DIRTY:
            return DIRTY_FIXED.unpack_from(self.data)[0]
        return len(self.data) if self.kind == Kind.WRITE else 0

    @property
    def target(self) -> str | None:
        """Second path: RENAME's new path, LINK's new name, SYMLINK's target."""
        if self.kind in (Kind.RENAME, Kind.LINK):
            return decode_path(split_pair(self.data)[1])
        if self.kind == Kind.SYMLINK:
            import os

            return os.fsdecode(split_pair(self.data)[0])
        return None

    @property
    def mode(self) -> int | None:
        if self.kind in (Kind.CREATE, Kind.MKDIR):
            return self.offset
        if self.kind == Kind.SETATTR and self.offset != NO_MODE:
            return self.offset
        return None

    @property
    def mtime_us(self) -> int | None:
        if self.kind == Kind.SETATTR:
            v = SETATTR_FIXED.unpack_from(self.data)[0]
            return None if v == INT64_MIN else v
        return None

    @property
    def name(self) -> str | None:
        """Bookmark name, BASE reference or DIRTY reason."""
        if self.kind in (Kind.BOOKMARK, Kind.BASE):
            return self.data.decode("utf-8", "replace")
        if self.kind == Kind.DIRTY:
            return self.data[DIRTY_FIXED.size :].decode("utf-8", "replace")
        return None

    @property
    def audit_entry(self) -> int | None:
        """AUDIT: the number of the audit-log entry this record anchors."""
        return self.offset if self.kind == Kind.AUDIT else None

    @property
    def audit_hash(self) -> str | None:
        """AUDIT: the SHA-256 of that entry, hex."""
        return self.data.hex() if self.kind == Kind.AUDIT else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "ts": self.ts,
            "time": format_us(self.ts),
            "kind": self.kind.name,
            "file_id": self.file_id,
            "path": self.path,
        }
        if self.kind in (Kind.WRITE, Kind.DIRTY):
            out["offset"] = self.offset
        if self.kind in (Kind.WRITE, Kind.TRUNCATE, Kind.DIRTY):
            out["length"] = self.length
        for key in ("target", "mode", "mtime_us", "name", "audit_entry", "audit_hash"):
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        return out
