"""Issue 3, item 8: one hypothesis state machine drives a live tree and its
journal through random writes, truncates, creates, renames, unlinks,
mkdirs, rmdirs, flushes and bookmarks at random timestamps (sometimes
equal, sometimes stepping back), against an in-memory model of the tree.

Checked at random moments: a restore at any recorded point (by seq, by
time, by bookmark) equals the model at that point; a rollback leaves the
live tree equal to the model at its point; rolling forward to the seq just
before the rollback gives back the later state. Checkpoints are saved at
random moments, so later restores and rollbacks start from them."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cdpcore import Journal, PointError, checkpoint, restore, rollback
from cdpcore.retention import Policy, prune

Model = tuple[frozenset[str], tuple[tuple[str, bytes], ...]]  # dirs, files
NAMES = ["a", "b", "d/c", "d/e", "f/g"]
DIRS = ["d", "f"]


def read_live(root: Path) -> Model:
    dirs, files = set(), {}
    for top, ds, fs in os.walk(root):
        rel = os.path.relpath(top, root)
        for d in ds:
            dirs.add(d if rel == "." else f"{rel}/{d}")
        for f in fs:
            files[f if rel == "." else f"{rel}/{f}"] = (Path(top) / f).read_bytes()
    return frozenset(dirs), tuple(sorted(files.items()))


class JournaledTree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cdp-stateful-"))
        self.root = self.tmp / "root"
        self.root.mkdir()
        self.j = Journal.create(self.tmp / "j", self.root, segment_size=4096)
        self.dirs: set[str] = set()
        self.files: dict[str, bytes] = {}
        # seq -> (ts, model after that record); bookmark name -> seq
        self.history: list[tuple[int, int, Model]] = []
        self.bookmarks: dict[str, int] = {}
        self.opaque: list[tuple[int, int]] = []  # [first, last) seqs a rollback appended
        self.clock = time.time_ns() // 1000 - 86_400_000_000  # a day ago
        self.n = 0

    def teardown(self) -> None:
        self.j.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- the model and the clock ------------------------------------------------

    def model(self) -> Model:
        return frozenset(self.dirs), tuple(sorted(self.files.items()))

    def stamp(self, step: int) -> int:
        self.clock += step
        return self.clock

    def done(self, seq: int, ts: int) -> None:
        """Record the model after `seq` (and the records before it that
        this operation appended, which leave states no point can name
        differently: FILEMAPs change nothing visible)."""
        self.history.append((seq, ts, self.model()))

    def parent_ok(self, path: str) -> bool:
        return "/" not in path or path.rsplit("/", 1)[0] in self.dirs

    # ---- operations: the live tree and the journal, like vendor code ------------

    @initialize()
    def start(self) -> None:
        self.done(self.j.last_seq, self.clock)

    @rule(name=st.sampled_from(NAMES), offset=st.integers(0, 300), data=st.binary(min_size=1, max_size=3000),
          step=st.sampled_from([0, 1, 1000, -500]))
    def write(self, name: str, offset: int, data: bytes, step: int) -> None:
        if not self.parent_ok(name) or name in self.dirs:
            return
        with open(self.root / name, "r+b" if name in self.files else "wb") as f:
            f.seek(offset)
            f.write(data)
        old = self.files.get(name, b"")
        grown = old.ljust(offset, b"\0")
        self.files[name] = grown[:offset] + data + grown[offset + len(data):]
        ts = self.stamp(step)
        self.done(self.j.append_write(name, offset, data, ts=ts), ts)

    @rule(length=st.integers(0, 400), step=st.sampled_from([0, 700]), data=st.data())
    def truncate(self, length: int, step: int, data: st.DataObject) -> None:
        if not self.files:
            return
        name = data.draw(st.sampled_from(sorted(self.files)))
        os.truncate(self.root / name, length)
        self.files[name] = self.files[name][:length].ljust(length, b"\0")
        ts = self.stamp(step)
        self.done(self.j.append_truncate(name, length, ts=ts), ts)

    @rule(new=st.sampled_from(NAMES), data=st.data())
    def rename(self, new: str, data: st.DataObject) -> None:
        if not self.files or not self.parent_ok(new) or new in self.dirs:
            return
        old = data.draw(st.sampled_from(sorted(self.files)))
        os.rename(self.root / old, self.root / new)
        self.files[new] = self.files.pop(old)
        ts = self.stamp(300)
        self.done(self.j.append_rename(old, new, ts=ts), ts)

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        if not self.files:
            return
        name = data.draw(st.sampled_from(sorted(self.files)))
        os.unlink(self.root / name)
        del self.files[name]
        ts = self.stamp(300)
        self.done(self.j.append_unlink(name, ts=ts), ts)

    @rule(name=st.sampled_from(DIRS))
    def mkdir(self, name: str) -> None:
        if name in self.dirs or name in self.files:
            return
        os.mkdir(self.root / name)
        self.dirs.add(name)
        ts = self.stamp(100)
        self.done(self.j.append_mkdir(name, ts=ts), ts)

    @rule(name=st.sampled_from(DIRS))
    def rmdir(self, name: str) -> None:
        if name not in self.dirs or any(p.startswith(name + "/") for p in self.files):
            return
        os.rmdir(self.root / name)
        self.dirs.discard(name)
        ts = self.stamp(100)
        self.done(self.j.append_rmdir(name, ts=ts), ts)

    @rule(step=st.sampled_from([0, 5000]))
    def flush_and_bookmark(self, step: int) -> None:
        ts = self.stamp(step)
        self.done(self.j.append_flush(ts=ts), ts)
        self.n += 1
        name = f"mark-{self.n}"
        self.bookmarks[name] = self.j.bookmark(name, ts=ts)
        self.done(self.bookmarks[name], ts)

    @rule(spacing=st.sampled_from([0, 10_000]))
    def save_checkpoints(self, spacing: int) -> None:
        """From here on, restores and rollbacks start from checkpoints (a
        cache, so the model does not change)."""
        res = checkpoint.update(self.j, spacing)
        event("checkpoints saved" if res.kept else "no sealed segment to checkpoint")

    # ---- checks -------------------------------------------------------------------

    def state_at_seq(self, seq: int) -> Model:
        return [m for s, _ts, m in self.history if s <= seq][-1]

    def seq_at_time(self, t: int) -> int | None:
        """Longest prefix, in seq order, of records stamped <= t, by brute
        force over every record's stamp (FILEMAPs and a rollback's records
        included: they are data here, not the algorithm under test). Inside
        history a prune folded, the kept point at or before it (a group's
        records keep stamps up to its kept point's running maximum); None
        when that is before the oldest kept point (refused)."""
        kept = self.j.compacted_points()
        seq = self.j.first_seq - 1 if kept else self.history[0][0]
        for rec in self.j.records():
            if rec.ts > t:
                break
            seq = rec.seq
        if kept and seq < kept[-1] and seq not in kept:
            below = [k for k in kept if k <= seq]
            return below[-1] if below else None
        return seq

    def restored(self, at: str) -> Model:
        dest = self.tmp / f"restore-{self.n}-{len(self.history)}"
        self.n += 1
        restore(self.j, dest, at=at)
        try:
            return read_live(dest)
        finally:
            shutil.rmtree(dest)

    @precondition(lambda self: len(self.history) > 1)
    @rule(data=st.data())
    def restore_a_point(self, data: st.DataObject) -> None:
        seq, ts, model = data.draw(st.sampled_from(self.history[1:]))
        note(f"restore seq:{seq}")
        assert self.restored(f"seq:{seq}") == model
        t = ts + data.draw(st.sampled_from([0, -1, 1]))
        at = self.seq_at_time(t)
        if at is None:
            with pytest.raises(PointError, match="before the"):
                self.restored(str(t))
        # the model knows no state inside a rollback's own records
        elif t >= self.history[1][1] and not any(lo <= at < hi for lo, hi in self.opaque):
            assert self.restored(str(t)) == self.state_at_seq(at)
        if self.bookmarks:
            name = data.draw(st.sampled_from(sorted(self.bookmarks)))
            assert self.restored(f"bookmark:{name}") == self.state_at_seq(self.bookmarks[name])

    @precondition(lambda self: len(self.history) > 2)
    @rule(data=st.data())
    def rollback_and_forward(self, data: st.DataObject) -> None:
        seq, _ts, model = data.draw(st.sampled_from(self.history[1:]))
        before_seq, before = self.j.last_seq, read_live(self.root)
        note(f"rollback to seq:{seq} from seq:{before_seq}")
        res = rollback(self.j, f"seq:{seq}", ts=self.stamp(data.draw(st.sampled_from([0, 1000, -500]))))
        assert read_live(self.root) == model
        # rolling forward undoes it: the seq before the rollback still restores the later state
        assert self.restored(f"seq:{before_seq}") == before
        # the live tree now is the model at `seq`; go on from there
        self.dirs, self.files = set(model[0]), dict(model[1])
        self.history = [h for h in self.history if h[0] <= before_seq]
        # The rollback appends its changes, then a FLUSH, a BOOKMARK and an
        # AUDIT anchor: from the FLUSH on, the tree is the point's.
        last = self.j.record(self.j.last_seq)
        settled = res.seq - 1 if res.seq else last.seq
        self.opaque.append((before_seq + 1, settled))
        for rec in self.j.records(since=f"seq:{settled - 1}"):
            self.done(rec.seq, rec.ts)

    # Also after a rollback: it stamps its records (and their audit anchor)
    # with this machine's clock (rollback(ts=)), so the policy and the kept
    # points are the same in every run of one example.
    @precondition(lambda self: len(self.history) > 3)
    @rule(fraction=st.sampled_from([0.3, 0.6, 0.9]), hourly=st.booleans(),
          drop_bookmarks=st.booleans())
    def prune_old_records(self, fraction: float, hourly: bool, drop_bookmarks: bool) -> None:
        """Kept points restore exactly what they restored before the prune."""
        for i in range(3):  # a busy spell, so that there are sealed segments to fold
            self.write("a", 0, bytes([65 + i]) * 4000, 1000)
        span = self.clock - self.history[1][1]
        policy = Policy(keep_all=max(1, int(span * (1 - fraction))),
                        keep_hourly=10 * 3_600_000_000 if hourly else 0,
                        drop_bookmarks=drop_bookmarks)
        res = prune(self.j, policy, now=self.clock)
        note(f"prune {policy}: boundary {res.boundary}, kept {res.kept}, dropped {res.dropped}")
        event("prune folded records" if res.boundary is not None else "prune had nothing to fold")
        if res.boundary is None:
            return
        assert not res.dropped  # every point the policy asked for is kept
        for seq in res.kept:
            assert self.restored(f"seq:{seq}") == self.state_at_seq(seq), seq
        assert self.restored("latest") == self.model()
        kept = set(res.kept)
        self.history = [h for h in self.history if h[0] > res.boundary or h[0] in kept]
        self.bookmarks = {n: s for n, s in self.bookmarks.items() if s > res.boundary or s in kept}
        assert self.j.verify().ok

    @invariant()
    def live_tree_is_the_model(self) -> None:
        assert read_live(self.root) == self.model()


JournaledTree.TestCase.settings = settings(stateful_step_count=40, deadline=None)
test_journaled_tree = JournaledTree.TestCase
