"""FileMap: which path each file id names at a given moment of the journal.

Data records carry a file id, not a path. FILEMAP and CREATE bind an id to
the file at a path; RENAME moves every id at or under the old path; UNLINK
RMDIR (of a directory and everything under it, as a restore applies it),
SYMLINK and LINK over an existing name, and replacing renames leave ids
naming no path (the writes of a program that kept the file open go to a
file that no longer has a name); BASE resets all.
"""
from __future__ import annotations

import os

from cdpcore.format import SETATTR_FIXED, Kind, decode_path, split_pair


def record_path(kind: int, payload: bytes) -> str | None:
    """The path a namespace record names (None for data-only kinds)."""
    if kind in (Kind.FILEMAP, Kind.CREATE, Kind.UNLINK, Kind.MKDIR, Kind.RMDIR):
        return decode_path(payload)
    if kind == Kind.SETATTR:
        return decode_path(payload[SETATTR_FIXED.size :])
    if kind in (Kind.RENAME, Kind.LINK):
        return decode_path(split_pair(payload)[0])
    if kind == Kind.SYMLINK:
        return decode_path(split_pair(payload)[1])
    return None


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


class FileMap:
    def __init__(self) -> None:
        self.paths: dict[int, str | None] = {}

    def path_of(self, file_id: int) -> str | None:
        return self.paths.get(file_id)

    def _drop_at(self, path: str, subtree: bool) -> None:
        for fid, p in self.paths.items():
            if p is not None and (under(p, path) if subtree else p == path):
                self.paths[fid] = None

    def apply(self, kind: int, file_id: int, payload: bytes) -> None:
        if kind == Kind.FILEMAP:
            self.paths[file_id] = decode_path(payload)
        elif kind == Kind.CREATE:
            path = decode_path(payload)
            self._drop_at(path, subtree=False)
            self.paths[file_id] = path
        elif kind == Kind.UNLINK:
            self._drop_at(decode_path(payload), subtree=False)
        elif kind == Kind.RMDIR:  # the directory and all under it (as a restore removes them)
            self._drop_at(decode_path(payload), subtree=True)
        elif kind in (Kind.SYMLINK, Kind.LINK):  # the new name replaces what was there
            self._drop_at(decode_path(split_pair(payload)[1]), subtree=False)
        elif kind == Kind.RENAME:
            a, b = split_pair(payload)
            old, new = decode_path(a), decode_path(b)
            if old == new:
                return
            moving = {fid for fid, p in self.paths.items() if p is not None and under(p, old)}
            for fid, p in self.paths.items():
                if fid not in moving and p is not None and under(p, new):
                    self.paths[fid] = None
            for fid in moving:
                p = self.paths[fid]
                assert p is not None
                self.paths[fid] = new + p[len(old):]
        elif kind == Kind.BASE:
            self.paths.clear()


def fs_path(root: str, rel: str) -> str:
    return os.path.join(root, *rel.split("/"))
