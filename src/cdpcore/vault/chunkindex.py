"""The chunk index: chunk id -> where the vault already holds those bytes.

One SQLite file per source (`VAULT/NAME/chunks.sqlite`) or per dedupe
domain (`VAULT/_domains/DOMAIN/chunks.sqlite`, shared by its sources).

The index is a cache of hints, never trusted for content: every lookup is
read back and its id recomputed (replica.py) before the bytes are used, so
an entry left stale by a crash, a prune or a torn tail only costs a NEED
round trip, never wrong data. That is why it commits after the data it
points to is fsync'd, and why WAL mode with synchronous=NORMAL is enough.
"""
from __future__ import annotations

import os
import sqlite3

from cdpcore.errors import VaultError


class ChunkIndex:
    """id -> (source, target, offset, length). For a sealed (encrypted)
    store, target is the pack file name and offset/length its ciphertext."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, source TEXT NOT NULL, "
                             "target TEXT NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL) WITHOUT ROWID")
            self._db.execute("CREATE INDEX IF NOT EXISTS by_target ON chunks (source, target)")
            self._db.execute("CREATE TABLE IF NOT EXISTS packs (source TEXT, no INTEGER, indexed INTEGER, "
                             "PRIMARY KEY (source, no))")
        except sqlite3.Error as e:
            raise VaultError(f"{path}: chunk index cannot be opened: {e}") from None
        self._pending: dict[bytes, tuple[str, str, int, int]] = {}

    def close(self) -> None:
        self._db.close()

    def add(self, cid: bytes, source: str, target: str, off: int, length: int) -> None:
        """Remember a chunk; written at the next commit()."""
        self._pending.setdefault(cid, (source, target, off, length))

    def lookup(self, cid: bytes) -> tuple[str, str, int, int] | None:
        p = self._pending.get(cid)  # not yet committed, but already written to its file
        if p is not None:
            return p
        row = self._db.execute("SELECT source, target, off, len FROM chunks WHERE id = ?", (cid,)).fetchone()
        return None if row is None else (row[0], row[1], int(row[2]), int(row[3]))

    def has(self, cid: bytes) -> bool:
        return self.lookup(cid) is not None

    def commit(self, packs: dict[int, int] | None = None, source: str = "") -> None:
        """Write pending entries (first one wins: the oldest copy stays the
        reference) and, for a sealed store, how far each pack file is indexed."""
        if not self._pending and not packs:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)",
                                 [(k, *v) for k, v in self._pending.items()])
            for no, end in (packs or {}).items():
                self._db.execute("INSERT OR REPLACE INTO packs VALUES (?, ?, ?)", (source, no, end))
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise VaultError(f"{self.path}: chunk index write failed: {e}") from None
        self._pending.clear()

    def pack_indexed(self, source: str, no: int) -> int:
        row = self._db.execute("SELECT indexed FROM packs WHERE source = ? AND no = ?", (source, no)).fetchone()
        return 0 if row is None else int(row[0])

    def drop_target(self, source: str, target: str) -> None:
        """Forget the chunks of a file that is gone (a pruned segment)."""
        self._pending = {k: v for k, v in self._pending.items() if (v[0], v[1]) != (source, target)}
        self._db.execute("DELETE FROM chunks WHERE source = ? AND target = ?", (source, target))

    def drop_below(self, source: str, prefix: str) -> None:
        """Forget the chunks of every file whose target starts with prefix
        (a removed base: "base/NAME/"). substr, not LIKE: '_' in a name is
        no wildcard."""
        self._pending = {k: v for k, v in self._pending.items()
                         if not (v[0] == source and v[1].startswith(prefix))}
        self._db.execute("DELETE FROM chunks WHERE source = ? AND substr(target, 1, ?) = ?",
                         (source, len(prefix), prefix))

    def rename_target(self, source: str, old: str, new: str) -> None:
        self._pending = {k: (v[0], new if (v[0], v[1]) == (source, old) else v[1], v[2], v[3])
                         for k, v in self._pending.items()}
        self._db.execute("UPDATE OR REPLACE chunks SET target = ? WHERE source = ? AND target = ?",
                         (new, source, old))

    def targets(self, source: str) -> set[str]:
        """The files the committed entries of `source` point into."""
        return {str(r[0]) for r in self._db.execute("SELECT DISTINCT target FROM chunks WHERE source = ?", (source,))}

    def entries_in(self, source: str, target: str) -> list[tuple[bytes, int, int]]:
        """(id, offset, length) of the committed entries that point into target."""
        rows = self._db.execute("SELECT id, off, len FROM chunks WHERE source = ? AND target = ?",
                                (source, target)).fetchall()
        return [(bytes(r[0]), int(r[1]), int(r[2])) for r in rows]

    def move(self, moves: list[tuple[bytes, str, str, int, int]], forget: list[bytes],
             gone_pack: tuple[str, int] | None = None) -> None:
        """Point chunks at their new place (id, source, target, off, len),
        forget others and the pack file they were in, in one transaction (a
        pack compaction)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)", moves)
            self._db.executemany("DELETE FROM chunks WHERE id = ?", [(f,) for f in forget])
            if gone_pack is not None:
                self._db.execute("DELETE FROM packs WHERE source = ? AND no = ?", gone_pack)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise VaultError(f"{self.path}: chunk index write failed: {e}") from None

    def count(self, source: str | None = None) -> int:
        if source is None:
            return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])
        return int(self._db.execute("SELECT count(*) FROM chunks WHERE source = ?", (source,)).fetchone()[0])


def open_index(directory: str) -> ChunkIndex:
    os.makedirs(directory, exist_ok=True)
    return ChunkIndex(os.path.join(directory, "chunks.sqlite"))
