"""diff(): what changed in the protected tree between two points.

Two plans of one journal (plan.py) are compared file by file: a file is an
inode key, the same in both plans when it is the same file, so a rename is
a key whose name changed, not a deletion and a creation. Byte ranges are
those whose content comes from different journal bytes (merged), which is
what was written in between, whatever the bytes were.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cdpcore.journal import Journal
from cdpcore.plan import Dir, Inode, Link, Node, Plan, build_plan, changed_ranges
from cdpcore.point import PointLike


@dataclass(slots=True)
class FileChange:
    path: str
    size_before: int
    size_after: int
    ranges: list[tuple[int, int]]  # [start, end) byte ranges that changed, merged

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size_before": self.size_before, "size_after": self.size_after,
                "bytes": sum(e - s for s, e in self.ranges), "ranges": [list(r) for r in self.ranges]}


@dataclass(slots=True)
class Diff:
    from_seq: int
    to_seq: int
    changed: list[FileChange] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)  # path, type, size
    deleted: list[dict[str, Any]] = field(default_factory=list)
    renamed: list[dict[str, Any]] = field(default_factory=list)  # from, to, size

    def to_json(self) -> dict[str, Any]:
        return {"from_seq": self.from_seq, "to_seq": self.to_seq,
                "changed": [c.to_json() for c in self.changed], "created": self.created,
                "deleted": self.deleted, "renamed": self.renamed}


def diff(journal: Journal | str | os.PathLike[str], since: PointLike, until: PointLike = "latest") -> Diff:
    """Changes from the state at `since` to the state at `until`."""
    if isinstance(journal, Journal):
        return _diff(journal, since, until)
    with Journal.open(journal, readonly=True) as j:
        return _diff(j, since, until)


def _diff(j: Journal, since: PointLike, until: PointLike) -> Diff:
    a_seq, b_seq = j.resolve(since), j.resolve(until)
    out = Diff(a_seq, b_seq)
    with build_plan(j, a_seq) as a, build_plan(j, b_seq) as b:
        compare(a, b, out)
    return out


def _entry(plan: Plan, path: str, node: Node) -> dict[str, Any]:
    if isinstance(node, Dir):
        return {"path": path, "type": "dir", "size": None}
    if isinstance(node, Link):
        return {"path": path, "type": "symlink", "size": None, "target": node.target}
    return {"path": path, "type": "file", "size": plan.size_of(node)}


def compare(a: Plan, b: Plan, out: Diff) -> None:
    A, B = a.tree.nodes, b.tree.nodes
    names_a: dict[int, list[str]] = {}
    names_b: dict[int, list[str]] = {}
    for nodes, names in ((A, names_a), (B, names_b)):
        for p in sorted(nodes):
            n = nodes[p]
            if isinstance(n, Inode):
                names.setdefault(n.key, []).append(p)
    for key, old in names_a.items():
        new = names_b.get(key)
        if new is None:
            out.deleted += [_entry(a, p, A[p]) for p in old]
            continue
        ino = B[new[0]]
        assert isinstance(ino, Inode)
        # names the file lost and gained: pairs are renames, the rest are
        # hard links removed or added
        lost = [p for p in old if p not in new]
        gained = [p for p in new if p not in old]
        for p, q in zip(lost, gained):
            out.renamed.append({"from": p, "to": q, "size": b.size_of(ino)})
        out.deleted += [_entry(a, p, A[p]) for p in lost[len(gained):]]
        out.created += [_entry(b, p, B[p]) for p in gained[len(lost):]]
        ranges = changed_ranges(a, A[old[0]], b, ino)  # type: ignore[arg-type]
        before, after = a.size_of(A[old[0]]), b.size_of(ino)  # type: ignore[arg-type]
        if ranges or before != after:
            out.changed.append(FileChange(new[0], before, after, ranges))
    for key, new in names_b.items():
        if key not in names_a:
            out.created += [_entry(b, p, B[p]) for p in new]
    for p in sorted(set(A) | set(B)):
        x, y = A.get(p), B.get(p)
        if isinstance(x, Inode) or isinstance(y, Inode):
            if x is not None and not isinstance(x, Inode):
                out.deleted.append(_entry(a, p, x))
            if y is not None and not isinstance(y, Inode):
                out.created.append(_entry(b, p, y))
            continue
        same = (isinstance(x, Dir) and isinstance(y, Dir)) or (
            isinstance(x, Link) and isinstance(y, Link) and x.target == y.target)
        if same:
            continue
        if x is not None:
            out.deleted.append(_entry(a, p, x))
        if y is not None:
            out.created.append(_entry(b, p, y))
    for lst in (out.created, out.deleted):
        lst.sort(key=lambda e: e["path"])
    out.changed.sort(key=lambda c: c.path)
