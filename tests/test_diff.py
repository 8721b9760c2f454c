"""diff(): what it reports explains the difference between two restores.

For random journals and two random points, the trees restored at both
points are compared with the diff: every name that went away is deleted or
renamed, every new name is created or a rename's target, and a file's
bytes outside its changed ranges (and within both sizes) are the same
before and after.
"""
from __future__ import annotations

import random
from pathlib import Path

from conftest import scratch
from hypothesis import given
from hypothesis import strategies as st
from test_cli import assert_error, cli
from test_restore_basic import read_tree
from test_rollback import random_journal

from cdpcore import Journal, restore
from cdpcore.diff import diff


@given(seed=st.integers(0, 2**32), n_ops=st.integers(1, 40))
def test_diff_explains_two_restores(seed: int, n_ops: int) -> None:
    rnd = random.Random(seed)
    with scratch() as d:
        tmp = Path(d)
        with random_journal(tmp, rnd, n_ops) as j:
            a = rnd.randint(max(j.first_seq - 1, 0), j.last_seq)
            b = rnd.randint(a, j.last_seq)
            res = diff(j, f"seq:{a}", f"seq:{b}")
            restore(j, tmp / "a", at=f"seq:{a}")
            restore(j, tmp / "b", at=f"seq:{b}")
    ta, tb = read_tree(tmp / "a"), read_tree(tmp / "b")
    renamed_from = {r["from"]: r["to"] for r in res.renamed}
    created = {e["path"] for e in res.created}
    deleted = {e["path"] for e in res.deleted}
    assert set(ta) - set(tb) <= deleted | set(renamed_from)
    assert set(tb) - set(ta) <= created | set(renamed_from.values())
    changes = {c.path: c for c in res.changed}
    old_name = {v: k for k, v in renamed_from.items()}
    for p, v in tb.items():
        if v[0] != "f" or p in created:
            continue
        q = old_name.get(p, p)
        before = ta.get(q)
        if before is None or before[0] != "f":
            continue  # a name that is also listed as created (a new hard link)
        old, new = before[1], v[1]
        c = changes.get(p)
        if c is None:
            assert old == new, f"{p} changed but is not listed"
            continue
        assert (c.size_before, c.size_after) == (len(old), len(new))
        keep = bytearray(min(len(old), len(new)))
        mask = [True] * len(keep)
        for s, e in c.ranges:
            for i in range(s, min(e, len(keep))):
                mask[i] = False
        assert all(old[i] == new[i] for i in range(len(keep)) if mask[i]), f"{p}: bytes outside the ranges"


def test_cli_diff(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with Journal.create(tmp_path / "j", root) as j:
        j.append_write("db", 0, b"x" * 10000)
        j.append_create("old.txt")
        first = j.append_flush()
        j.append_write("db", 4096, b"y" * 100)
        j.append_write("db", 4196, b"z" * 100)  # merged with the previous range
        j.append_rename("old.txt", "new.txt")
        j.append_create("added")
        j.append_unlink("added")
        j.append_mkdir("dir")
        j.sync()
    r = cli("diff", tmp_path / "j", "--from", f"seq:{first}", "--json")
    assert r.code == 0, r.err
    assert r.doc["changed"] == [{"path": "db", "size_before": 10000, "size_after": 10000, "bytes": 200,
                                 "ranges": [[4096, 4296]]}]
    assert r.doc["renamed"] == [{"from": "old.txt", "to": "new.txt", "size": 0}]
    assert r.doc["created"] == [{"path": "dir", "type": "dir", "size": None}] and r.doc["deleted"] == []
    r = cli("diff", tmp_path / "j", "--from", f"seq:{first}")
    assert r.code == 0 and "M db" in r.out and "R old.txt -> new.txt" in r.out
    assert_error(("diff", tmp_path / "j"), 2, "UsageError")  # --from is required
    assert_error(("diff", tmp_path / "j", "--from", "bookmark:nope"), 6, "PointError")
