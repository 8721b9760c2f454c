"""The sealed store: an encrypted source's replica, which the vault cannot read.

Theory of operation. For a source shipped with `--encrypt-key`, DATA
bodies are sealed packs (packing.py): a recipe of (chunk id, plaintext
length) and the ciphertexts of chunks the vault did not hold. The vault
cannot decrypt, so it cannot check records; it checks frame structure and
sizes, keeps positions exactly as for a plaintext replica (plaintext
offsets, summed from the recipe), and stores:

```
VAULT/NAME/sealed/
  packs/NNNNNNNN.pack        ciphertext chunks, appended: [id 32][len u32 LE][ciphertext]
  recipes/SSSSSSSSSSSSSSSS.seg[.incoming]   a segment: its 64-byte header, then
                             entries [id 32][plaintext len u32 LE]
  recipes/journal.json, recipes/audit.log   the same entries, no header
  bases/NAME[.incoming]/entries.jsonl       one JSON line per base entry (path, kind,
                             size, mode, mtime_us, target, recipe)
  bases/NAME[.incoming]/R.recipe            a base file's entries (R: hash of its path)
```

Crash truth: an entry is kept at open only if it is whole and its chunk
is in a pack file (packs are fsync'd before recipes); a torn tail is cut.
Pack files are re-indexed from where the index last committed. The
segment header is stored in clear: it is in the SEGMENT frame, and holds
the journal uuid, numbers and a creation time, no content.

`materialize()` is the inverse for a key holder: it rebuilds the journal
directory, checking every chunk three ways (AEAD tag, length, id) so that a
damaged or substituted chunk is an error, never wrong data.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdpcore.crypto import ID_SIZE, Keys, key_id
from cdpcore.errors import KeyFileError, ProtocolError, VaultError
from cdpcore.format import META_NAME, SEG_HDR_SIZE, parse_segment_name, segment_name
from cdpcore.packing import open_chunk, unpack_sealed
from cdpcore.vault.replica import (
    AUDIT_NAME,
    INCOMING,
    MATERIALIZED_MARK,
    MAX_FRAME_OUTPUT,
    POSITION_NAME,
    PRUNE_NAME,
    _rel_parts,
    _step,
    fsync_dir,
    valid_name,
    write_durable,
)

if TYPE_CHECKING:
    from cdpcore.vault.replica import Replica

SEALED_DIR = "sealed"
ENTRY = struct.Struct("<32sI")  # a recipe entry: chunk id, plaintext length
PACK_HDR = struct.Struct("<32sI")  # a pack file entry header: chunk id, ciphertext length
PACK_ROLL = 256 * 1024 * 1024  # start a new pack file past this size
MAX_CHUNK = 64 * 1024 * 1024


@dataclass
class _Recipe:
    key: str  # path relative to sealed/
    kind: str  # "seg", "meta", "append"
    size: int  # plaintext bytes described (header included for a segment)
    durable: int
    header: bytes = b""
    seg: int | None = None
    name: str = ""


class SealedStore:
    def __init__(self, replica: "Replica"):
        self.r = replica
        self.dir = os.path.join(replica.dir, SEALED_DIR)
        for sub in ("packs", "recipes", "bases"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self.index = replica.index
        self._recipes: dict[str, _Recipe] = {}
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._sealed: dict[int, int] = {}
        self._pack_no = 0
        self._pack_fd = -1
        self._pack_size = 0
        self._packs_touched: dict[int, int] = {}
        self._entries_dirty: set[str] = set()
        self._read_fds: dict[str, int] = {}
        self._load()

    # ---- opening ---------------------------------------------------------------

    def _load(self) -> None:
        self._finish_prune()
        try:
            with open(os.path.join(self.r.dir, POSITION_NAME), "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as e:
            raise VaultError(f"{self.r.dir}/{POSITION_NAME}: unreadable ({e})") from None
        self._sealed = {int(k): int(v[0]) for k, v in doc.get("sealed", {}).items()}
        self._reindex_packs()
        rdir = os.path.join(self.dir, "recipes")
        for fn in sorted(os.listdir(rdir)):
            base = fn[:-len(INCOMING)] if fn.endswith(INCOMING) else fn
            seg = parse_segment_name(base)
            if seg is not None:
                self._load_recipe(f"recipes/{fn}", "seg", seg=seg)
            elif fn in (META_NAME, AUDIT_NAME):
                self._load_recipe(f"recipes/{fn}", "meta" if fn == META_NAME else "append", name=fn)
        bdir = os.path.join(self.dir, "bases")
        for b in os.listdir(bdir):
            if b.endswith(INCOMING):
                for fn in os.listdir(os.path.join(bdir, b)):
                    if fn.endswith(".recipe"):
                        self._load_recipe(f"bases/{b}/{fn}", "append")
                for e in self._entries(f"bases/{b}"):
                    if e.get("recipe") and f"bases/{b}/{e['recipe']}" in self._recipes:
                        self._recipes[f"bases/{b}/{e['recipe']}"].name = e["path"]

    def _reindex_packs(self) -> None:
        pdir = os.path.join(self.dir, "packs")
        nums = sorted(int(fn[:-5], 16) for fn in os.listdir(pdir) if fn.endswith(".pack"))
        for no in nums:
            path = os.path.join(pdir, f"{no:08x}.pack")
            pos = self.index.pack_indexed(self.r.name, no)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                while pos + PACK_HDR.size <= size:
                    f.seek(pos)
                    cid, n = PACK_HDR.unpack(f.read(PACK_HDR.size))
                    if n == 0 or n > MAX_CHUNK or pos + PACK_HDR.size + n > size:
                        break
                    self.index.add(cid, self.r.name, f"packs/{no:08x}.pack", pos, PACK_HDR.size + n)
                    pos += PACK_HDR.size + n
                if pos < size:
                    f.truncate(pos)
                    os.fsync(f.fileno())
                    self.r.recovery.append(f"{self.r.name}: cut a torn tail of {size - pos} bytes from pack {no:08x}")
            self._packs_touched[no] = pos
        self._pack_no = nums[-1] if nums else 1
        self._pack_size = self._packs_touched.get(self._pack_no, 0)
        self.index.commit(self._packs_touched, self.r.name)

    def _load_recipe(self, key: str, kind: str, seg: int | None = None, name: str = "") -> None:
        path = os.path.join(self.dir, key)
        with open(path, "r+b") as f:
            raw = f.read()
            hdr = b""
            pos = 0
            if kind == "seg":
                if len(raw) < SEG_HDR_SIZE:
                    f.close()
                    os.unlink(path)
                    return
                hdr, pos = raw[:SEG_HDR_SIZE], SEG_HDR_SIZE
            size = len(hdr)
            while pos + ENTRY.size <= len(raw):
                cid, n = ENTRY.unpack_from(raw, pos)
                if n == 0 or not self._held(cid):
                    break
                size += n
                pos += ENTRY.size
            if pos < len(raw):
                f.truncate(pos)
                os.fsync(f.fileno())
                self.r.recovery.append(f"{self.r.name}: cut a torn tail of {len(raw) - pos} bytes from sealed/{key}")
        self._recipes[key] = _Recipe(key, kind, size, size, hdr, seg, name)

    def _held(self, cid: bytes) -> bool:
        """The chunk is in a pack file: the index says where, and the pack
        entry there carries the same id (an index entry is only a hint)."""
        hit = self.index.lookup(cid)
        if hit is None or hit[0] != self.r.name:
            return False
        fd = self._read_fds.get(hit[1])
        if fd is None:
            try:
                fd = self._read_fds[hit[1]] = os.open(os.path.join(self.dir, hit[1]), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return os.pread(fd, ID_SIZE, hit[2]) == cid

    # ---- position ----------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        segs = []
        for t in sorted(self._recipes.values(), key=lambda t: (t.seg or 0, t.key)):
            if t.kind == "seg":
                crc = int.from_bytes(t.header[60:64], "little")
                segs.append([t.seg, crc, t.durable, not t.key.endswith(INCOMING) and self._sealed.get(t.seg) == t.durable])
        files = {t.name: t.durable for t in self._recipes.values() if t.kind != "seg" and t.name}
        bdir = os.path.join(self.dir, "bases")
        bases = sorted(b for b in os.listdir(bdir) if valid_name(b) and not b.endswith(INCOMING))
        return {"segments": segs, "files": files, "bases": bases}

    # ---- segments ------------------------------------------------------------------

    def begin_segment(self, seg: int, header: bytes, replace: bool) -> None:
        self.r._check_header(seg, header)
        key = f"recipes/{segment_name(seg)}" + (INCOMING if replace else "")
        t = self._recipes.get(key)
        if t is not None:
            if t.header == header:
                return
            if not replace:
                raise ProtocolError(f"segment {seg:016x} exists with another header; a prune's replacement "
                                    "must be sent with replace")
            self._close(key)
        if not replace:
            live = [x.seg for x in self._recipes.values() if x.kind == "seg" and not x.key.endswith(INCOMING)]
            if live and seg != max(live) + 1:  # type: ignore[type-var, operator]
                raise ProtocolError(f"segment {seg:016x} out of order: the replica's last segment is "
                                    f"{max(live):016x}")  # type: ignore[type-var]
        fd = os.open(os.path.join(self.dir, key), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.pwrite(fd, header, 0)
        self._fds[key] = fd
        self._recipes[key] = _Recipe(key, "seg", SEG_HDR_SIZE, 0, header, seg)
        self._dirty.add(key)

    def _target(self, target: int | str) -> _Recipe:
        if isinstance(target, bool) or not isinstance(target, (int, str)):
            raise ProtocolError(f"data target must be a segment number or a file path, got {target!r}")
        if isinstance(target, int):
            inc = f"recipes/{segment_name(target)}{INCOMING}"
            t = self._recipes.get(inc) or self._recipes.get(f"recipes/{segment_name(target)}")
            if t is None:
                raise ProtocolError(f"data for segment {target:016x}, which was not begun")
            return t
        if target in (META_NAME, AUDIT_NAME):
            key = f"recipes/{target}"
            return self._recipes.get(key) or _Recipe(key, "meta" if target == META_NAME else "append", 0, 0,
                                                     name=target)
        parts = _rel_parts(target)
        if parts[0] != "base" or len(parts) < 3 or not valid_name(parts[1]):
            raise ProtocolError(f"file {target!r} is not journal.json, audit.log or base/NAME/PATH")
        if os.path.lexists(os.path.join(self.dir, "bases", parts[1])):
            raise ProtocolError(f"data for {target!r}, but base {parts[1]} is already complete")
        key = f"bases/{parts[1]}{INCOMING}/{_recipe_name(target)}"
        return self._recipes.get(key) or _Recipe(key, "append", 0, 0, name=target)

    def apply_data(self, target: int | str, off: int, end: int, body: bytes,
                   first_seq: int | None, last_seq: int | None) -> list[bytes]:
        t = self._target(target)
        if type(off) is not int or type(end) is not int or not 0 <= off < end or end - off > MAX_FRAME_OUTPUT:
            raise ProtocolError(f"data range [{off}, {end}) is empty, negative or over {MAX_FRAME_OUTPUT} bytes")
        if t.kind == "seg" and off < SEG_HDR_SIZE:
            raise ProtocolError(f"data for a segment starts at offset {off}, inside its header")
        if t.kind == "meta" and off != 0:
            raise ProtocolError(f"{META_NAME} is sent whole, from offset 0 (got offset {off})")
        if t.kind != "meta" and off > t.size:
            raise ProtocolError(f"data for {target!r} starts at offset {off}, past the replica's end {t.size}: "
                                "that would leave a hole")
        sp = unpack_sealed(body, max_output=end - off)
        if sum(n for _, n in sp.recipe) != end - off:
            raise ProtocolError(f"sealed data for {target!r} [{off}, {end}) describes "
                                f"{sum(n for _, n in sp.recipe)} bytes")
        if t.kind != "meta" and end <= t.size:
            return []  # a resend of what is held (ciphertext cannot be compared to plaintext)
        new = dict(sp.new)
        missing = [cid for cid, _ in sp.recipe if cid not in new and not self._held(cid)]
        if missing:
            return list(dict.fromkeys(missing))
        entries = sp.recipe
        if t.kind != "meta":
            skip, pos = 0, off
            while pos < t.size:
                pos += entries[skip][1]
                skip += 1
            if pos != t.size:
                raise ProtocolError(f"sealed data for {target!r} overlaps the replica's end {t.size} "
                                    "mid-chunk")
            entries = entries[skip:]
        self._recipes[t.key] = t  # registered only once the frame passed every check
        os.makedirs(os.path.dirname(os.path.join(self.dir, t.key)), exist_ok=True)
        for cid, _n in entries:
            if cid in new and not self._held(cid):
                self._append_chunk(cid, new.pop(cid))
        raw = b"".join(ENTRY.pack(cid, n) for cid, n in entries)
        if t.kind == "meta":
            if self._pack_fd >= 0:
                os.fdatasync(self._pack_fd)  # the chunks before the recipe that names them
            write_durable(os.path.join(self.dir, t.key), raw)
            t.size = t.durable = end
            self._position_changed = True
            return []
        fd = self._fd(t)
        os.pwrite(fd, raw, os.fstat(fd).st_size)
        t.size = end
        self._dirty.add(t.key)
        return []

    def _fd(self, t: _Recipe) -> int:
        fd = self._fds.get(t.key)
        if fd is None:
            fd = os.open(os.path.join(self.dir, t.key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            if t.size == 0:
                os.ftruncate(fd, 0)
            self._fds[t.key] = fd
        return fd

    def _append_chunk(self, cid: bytes, ct: bytes) -> None:
        if self._pack_fd < 0 or self._pack_size > PACK_ROLL:
            if self._pack_fd >= 0:
                os.fdatasync(self._pack_fd)
                os.close(self._pack_fd)
                self._pack_no += 1
                self._pack_size = 0
            path = os.path.join(self.dir, "packs", f"{self._pack_no:08x}.pack")
            self._pack_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pack_size = os.fstat(self._pack_fd).st_size
        os.pwrite(self._pack_fd, PACK_HDR.pack(cid, len(ct)) + ct, self._pack_size)
        self.index.add(cid, self.r.name, f"packs/{self._pack_no:08x}.pack", self._pack_size, PACK_HDR.size + len(ct))
        self._pack_size += PACK_HDR.size + len(ct)
        self._packs_touched[self._pack_no] = self._pack_size

    # ---- durability ------------------------------------------------------------------

    _position_changed = False

    def sync(self) -> list[tuple[int | str, int, int | None]]:
        if self._pack_fd >= 0:
            os.fdatasync(self._pack_fd)  # chunks before the recipes that name them
        acks: list[tuple[int | str, int, int | None]] = []
        for key in sorted(self._dirty):
            t = self._recipes[key]
            fd = self._fds.get(key)
            if fd is not None:
                os.fdatasync(fd)
            if t.kind != "seg":
                self._position_changed = True
            t.durable = t.size
            acks.append((t.seg, t.durable, None) if t.kind == "seg" else (t.name, t.durable, None))
        for sub in ("packs", "recipes"):
            fsync_dir(os.path.join(self.dir, sub))
        for b in self._entries_dirty:
            fsync_dir(os.path.join(self.dir, b))
        self._entries_dirty.clear()
        self._dirty.clear()
        if self._position_changed:
            self._write_position()
        self.index.commit(self._packs_touched, self.r.name)
        return acks

    def _write_position(self) -> None:
        doc = {"files": {t.key: t.durable for t in self._recipes.values() if t.kind != "seg"},
               "sealed": {str(k): [v, 0] for k, v in sorted(self._sealed.items())}}
        write_durable(os.path.join(self.r.dir, POSITION_NAME), json.dumps(doc, sort_keys=True).encode())
        self._position_changed = False

    def seal(self, seg: int, size: int) -> None:
        t = self._recipes.get(f"recipes/{segment_name(seg)}")
        if t is None or t.size != size:
            raise ProtocolError(f"seal of segment {seg:016x} at {size} bytes, the replica holds "
                                f"{'nothing' if t is None else t.size}")
        self.sync()
        self._sealed[seg] = size
        self._write_position()

    # ---- bases ---------------------------------------------------------------------------

    def _entries(self, bkey: str) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self.dir, bkey, "entries.jsonl"), "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                break  # a torn last line
        return out

    def file_entry(self, path: str, size: int, mode: int, mtime_us: int, kind: str, target: str | None) -> None:
        parts = _rel_parts(path)
        if parts[0] != "base" or len(parts) < 2 or not valid_name(parts[1]):
            raise ProtocolError(f"base entry {path!r} is not base/NAME or base/NAME/PATH")
        if len(parts) == 2 and kind != "dir":
            raise ProtocolError(f"base entry {path!r}: a base is a directory, not a {kind!r}")
        if os.path.lexists(os.path.join(self.dir, "bases", parts[1])):
            return
        if kind not in ("file", "dir", "symlink") or type(mode) is not int or type(mtime_us) is not int:
            raise ProtocolError(f"base entry {path!r}: bad kind, mode or mtime")
        bkey = f"bases/{parts[1]}{INCOMING}"
        os.makedirs(os.path.join(self.dir, bkey), exist_ok=True)
        entry: dict[str, Any] = {"path": "/".join(parts[2:]), "kind": kind, "mode": mode, "mtime_us": mtime_us}
        if kind == "file":
            t = self._recipes.get(f"{bkey}/{_recipe_name(path)}")
            if (0 if t is None else t.size) != size:
                raise ProtocolError(f"base entry {path!r} is {size} bytes, the vault received "
                                    f"{0 if t is None else t.size}")
            entry["size"] = size
            entry["recipe"] = _recipe_name(path) if t is not None else None
        elif kind == "symlink":
            if not isinstance(target, str) or not target or "\0" in target:
                raise ProtocolError(f"base entry {path!r}: bad symlink target")
            entry["target"] = target
        fd = os.open(os.path.join(self.dir, bkey, "entries.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(entry, sort_keys=True).encode() + b"\n")
        finally:
            os.close(fd)
        self._entries_dirty.add(bkey)

    def base_complete(self, name: str) -> None:
        if not valid_name(name):
            raise ProtocolError(f"base name {name!r} is not valid")
        bdir = os.path.join(self.dir, "bases")
        final, inc = os.path.join(bdir, name), os.path.join(bdir, name + INCOMING)
        if os.path.lexists(final):
            return
        os.makedirs(inc, exist_ok=True)
        self.sync()
        for fn in os.listdir(inc):
            fd = os.open(os.path.join(inc, fn), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(inc)
        os.rename(inc, final)
        fsync_dir(bdir)
        prefix = f"bases/{name}{INCOMING}/"
        for key in [k for k in self._recipes if k.startswith(prefix)]:
            self._close(key)
            del self._recipes[key]
        self._write_position()

    # ---- prune -----------------------------------------------------------------------------

    def prune(self, segments: list[list[int]], bases: list[str]) -> None:
        self.sync()
        swap, keep = [], []
        for item in segments:
            if not isinstance(item, (list, tuple)) or len(item) != 3 or not all(type(x) is int for x in item):
                raise ProtocolError(f"prune: segment entry {item!r} is not [seg, header_crc, size]")
            seg, crc, size = item
            inc = self._recipes.get(f"recipes/{segment_name(seg)}{INCOMING}")
            live = self._recipes.get(f"recipes/{segment_name(seg)}")
            if inc is not None and int.from_bytes(inc.header[60:64], "little") == crc and inc.size == size:
                swap.append(seg)
            elif live is not None and int.from_bytes(live.header[60:64], "little") == crc and live.size == size:
                keep.append(seg)
            else:
                raise ProtocolError(f"prune names segment {seg:016x} (crc {crc:08x}, {size} bytes), which the "
                                    "vault does not hold complete")
        have_bases = self.position()["bases"]
        for b in bases:
            if b not in have_bases:
                raise ProtocolError(f"prune names base {b!r}, which the vault does not hold complete")
        named = set(swap) | set(keep)
        remove = sorted(t.seg for t in self._recipes.values()  # type: ignore[misc]
                        if t.kind == "seg" and not t.key.endswith(INCOMING) and t.seg not in named)
        manifest = {"swap": sorted(swap), "remove": remove, "bases": [b for b in have_bases if b not in bases]}
        _step("manifest")
        write_durable(os.path.join(self.r.dir, PRUNE_NAME), json.dumps(manifest).encode())
        for key in list(self._fds):
            self._close(key)
        self._recipes = {}
        self._load()
        self.compact()

    def live_ids(self) -> set[bytes]:
        """Every chunk some recipe (segment, file, base, incoming or not) names."""
        live: set[bytes] = set()
        for sub in ("recipes", "bases"):
            for dirpath, _dirs, files in os.walk(os.path.join(self.dir, sub)):
                for fn in files:
                    if fn == "entries.jsonl":
                        continue
                    with open(os.path.join(dirpath, fn), "rb") as f:
                        raw = f.read()
                    pos = SEG_HDR_SIZE if parse_segment_name(fn.removesuffix(INCOMING)) is not None else 0
                    while pos + ENTRY.size <= len(raw):
                        live.add(raw[pos:pos + ID_SIZE])
                        pos += ENTRY.size
        return live

    def compact(self, threshold: float = 0.5) -> int:
        """Rewrite pack files in which less than `threshold` of the bytes are
        chunks a recipe still names (after a prune); returns bytes reclaimed.
        Crash-safe by order: the new pack is fsync'd, then the index points
        at it, then the old pack is deleted; a crash leaves at worst a
        duplicate pack, reclaimed next time."""
        self.sync()
        live = self.live_ids()
        pdir = os.path.join(self.dir, "packs")
        reclaimed = 0
        for fn in sorted(os.listdir(pdir)):
            if not fn.endswith(".pack"):
                continue
            no = int(fn[:-5], 16)
            target = f"packs/{fn}"
            size = os.path.getsize(os.path.join(pdir, fn))
            entries = self.index.entries_in(self.r.name, target)
            keep = [(cid, off, n) for cid, off, n in entries if cid in live]
            if size and sum(n for _, _, n in keep) >= threshold * size:
                continue
            _step(f"compact {fn}")
            moves: list[tuple[bytes, str, str, int, int]] = []
            if self._pack_fd >= 0:  # appends go to a new pack from here on
                os.close(self._pack_fd)
                self._pack_fd = -1
            if keep:
                self._pack_no += 1  # a fresh number: the current pack is the highest
                new_fn = f"{self._pack_no:08x}.pack"
                with open(os.path.join(pdir, fn), "rb") as src, open(os.path.join(pdir, new_fn), "wb") as dst:
                    pos = 0
                    for cid, off, n in keep:
                        src.seek(off)
                        dst.write(src.read(n))
                        moves.append((cid, self.r.name, f"packs/{new_fn}", pos, n))
                        pos += n
                    dst.flush()
                    os.fsync(dst.fileno())
                fsync_dir(pdir)
                self._packs_touched[self._pack_no] = pos
                self.index.commit(self._packs_touched, self.r.name)
            elif no == self._pack_no:
                self._pack_no += 1  # never append to a deleted pack's number
            self._packs_touched.pop(no, None)
            self.index.move(moves, [cid for cid, _, _ in entries if cid not in live], (self.r.name, no))
            _step(f"compact delete {fn}")
            fd = self._read_fds.pop(target, None)
            if fd is not None:
                os.close(fd)
            os.unlink(os.path.join(pdir, fn))
            fsync_dir(pdir)
            reclaimed += size - sum(n for _, _, n in keep)
        return reclaimed

    def _finish_prune(self) -> None:
        mpath = os.path.join(self.r.dir, PRUNE_NAME)
        try:
            with open(mpath, "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise VaultError(f"{mpath}: unreadable prune manifest ({e})") from None
        rdir = os.path.join(self.dir, "recipes")
        for seg in manifest["swap"]:
            live = os.path.join(rdir, segment_name(seg))
            if os.path.exists(live + INCOMING):
                _step(f"swap {seg}")
                os.replace(live + INCOMING, live)
        for seg in manifest["remove"]:
            if os.path.exists(os.path.join(rdir, segment_name(seg))):
                _step(f"remove {seg}")
                os.unlink(os.path.join(rdir, segment_name(seg)))
        fsync_dir(rdir)
        for b in manifest["bases"]:
            path = os.path.join(self.dir, "bases", b)
            if os.path.lexists(path):
                _step(f"remove base {b}")
                os.replace(path, path + ".removing")
                shutil.rmtree(path + ".removing")
        _step("done")
        # Pack files still hold the chunks of removed segments: compact() follows.
        try:
            with open(os.path.join(self.r.dir, POSITION_NAME), "rb") as f:
                doc = json.loads(f.read())
            doc["sealed"] = {k: v for k, v in doc.get("sealed", {}).items()
                             if int(k) not in set(manifest["swap"]) | set(manifest["remove"])}
            write_durable(os.path.join(self.r.dir, POSITION_NAME), json.dumps(doc, sort_keys=True).encode())
        except FileNotFoundError:
            pass
        os.unlink(mpath)
        fsync_dir(self.r.dir)

    # ---- lifecycle -------------------------------------------------------------------------

    def _close(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self._close(key)
        if self._pack_fd >= 0:
            os.close(self._pack_fd)
            self._pack_fd = -1
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()


def _recipe_name(path: str) -> str:
    """A base file's recipe file name: frames' paths never become vault paths."""
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:40] + ".recipe"


# ---- materialisation: for the key holder -----------------------------------------------------

class _Chunks:
    """Reads chunks of one sealed store by id, verified."""

    def __init__(self, sdir: str, keys: Keys):
        import sqlite3

        self.sdir, self.keys = sdir, keys
        top = os.path.dirname(sdir)
        self.db = sqlite3.connect(f"file:{os.path.join(top, 'chunks.sqlite')}?mode=ro", uri=True)
        self.name = os.path.basename(top)

    def read(self, cid: bytes, n: int) -> bytes:
        row = self.db.execute("SELECT target, off, len FROM chunks WHERE id = ? AND source = ?",
                              (cid, self.name)).fetchone()
        if row is None:
            raise VaultError(f"sealed store: chunk {cid.hex()[:16]} is missing (if the receiver is "
                             "writing this replica now, retry)")
        with open(os.path.join(self.sdir, row[0]), "rb") as f:
            f.seek(row[1])
            raw = f.read(row[2])
        if len(raw) < PACK_HDR.size or raw[:ID_SIZE] != cid:
            raise VaultError(f"sealed store: chunk {cid.hex()[:16]} is damaged in {row[0]}")
        return open_chunk(self.keys, cid, raw[PACK_HDR.size:], n)

    def recipe(self, path: str, out: str, header: bool) -> None:
        with open(path, "rb") as f:
            raw = f.read()
        pos = SEG_HDR_SIZE if header else 0
        with open(out, "wb") as o:
            o.write(raw[:pos])
            while pos + ENTRY.size <= len(raw):
                cid, n = ENTRY.unpack_from(raw, pos)
                o.write(self.read(cid, n))
                pos += ENTRY.size


def materialize(replica_dir: str | os.PathLike[str], keys: Keys, out_dir: str | os.PathLike[str]) -> str:
    """Rebuild an encrypted replica's journal into out_dir (absent or empty),
    checking every chunk (AEAD tag, length, id); returns out_dir. A wrong key
    fails on the first chunk with KeyFileError."""
    rdir, out = os.fspath(replica_dir), os.path.abspath(os.fspath(out_dir))
    sdir = os.path.join(rdir, SEALED_DIR)
    if not os.path.isdir(sdir):
        raise VaultError(f"{rdir}: not an encrypted replica (no {SEALED_DIR}/)")
    if os.path.exists(out) and os.listdir(out):
        raise VaultError(f"{out} is not empty")
    _check_key(rdir, keys)
    ch = _Chunks(sdir, keys)
    try:
        os.makedirs(os.path.join(out, "segments"), exist_ok=True)
        recipes = os.path.join(sdir, "recipes")
        for fn in sorted(os.listdir(recipes)):
            if parse_segment_name(fn) is not None:
                ch.recipe(os.path.join(recipes, fn), os.path.join(out, "segments", fn), header=True)
            elif fn in (META_NAME, AUDIT_NAME):
                ch.recipe(os.path.join(recipes, fn), os.path.join(out, fn), header=False)
        bdir = os.path.join(sdir, "bases")
        for b in sorted(os.listdir(bdir)):
            if not valid_name(b) or b.endswith(INCOMING):
                continue
            top = os.path.join(out, "base", b)
            os.makedirs(top)
            entries = _read_entries(os.path.join(bdir, b))
            dirs: dict[str, dict[str, Any]] = {}  # the last entry of a directory wins
            for e in entries:
                # "" is the base's top directory itself (its mode and mtime)
                dest = os.path.join(top, *_rel_parts(e["path"])) if e["path"] else top
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                ns = (e["mtime_us"] * 1000, e["mtime_us"] * 1000)
                if e["kind"] == "dir":
                    os.makedirs(dest, exist_ok=True)
                    dirs[dest] = e
                elif e["kind"] == "symlink":
                    os.symlink(e["target"], dest)
                    os.utime(dest, ns=ns, follow_symlinks=False)
                else:
                    if e.get("recipe"):
                        ch.recipe(os.path.join(bdir, b, e["recipe"]), dest, header=False)
                    else:
                        open(dest, "wb").close()
                    os.chmod(dest, e["mode"] & 0o7777)
                    os.utime(dest, ns=ns)
            # directory times last, deepest first: making entries in a directory changes its mtime
            for dest, e in sorted(dirs.items(), key=lambda d: -d[0].count(os.sep)):
                os.chmod(dest, e["mode"] & 0o7777)
                os.utime(dest, ns=(e["mtime_us"] * 1000, e["mtime_us"] * 1000))
    finally:
        ch.db.close()
    from cdpcore.journal import Journal

    # A writable open builds what is not replicated (head, indexes): the
    # result is a plain journal that verify finds whole.
    Journal.open(out).close()
    return out


def _check_key(rdir: str, keys: Keys) -> None:
    """Name a wrong key as such when the vault knows the source's key
    fingerprint (source.json "key_id"); without it the first chunk that
    does not open says "wrong key, or damaged"."""
    try:
        with open(os.path.join(rdir, "source.json"), "rb") as f:
            held = json.loads(f.read()).get("key_id")
    except (OSError, ValueError, AttributeError):
        return  # the chunks' AEAD tags still catch a wrong key
    if isinstance(held, str) and held != key_id(keys).hex():
        raise KeyFileError(f"{rdir}: wrong key: this replica was shipped with the key of fingerprint "
                           f"{held[:16]}, the key file given has {key_id(keys).hex()[:16]}")


@contextmanager
def materialized(replica_dir: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> Iterator[str]:
    """A scratch journal rebuilt from an encrypted replica (VAULT/NAME) in
    VAULT/_tmp/, removed afterwards."""
    from cdpcore.crypto import load_key_file

    keys = load_key_file(key_file)
    rdir = os.path.abspath(os.fspath(replica_dir))
    if not os.path.isdir(os.path.join(rdir, SEALED_DIR)):
        raise VaultError(f"{rdir}: --encrypt-key given, but this is not an encrypted vault replica")
    tmp_top = os.path.join(os.path.dirname(rdir), "_tmp")
    os.makedirs(tmp_top, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=os.path.basename(rdir) + "-", dir=tmp_top)
    try:
        out = materialize(rdir, keys, scratch)
        # what is done with the scratch journal is entered in the replica's access log
        with open(os.path.join(out, MATERIALIZED_MARK), "w", encoding="utf-8") as f:
            f.write(rdir + "\n")
        yield out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _read_entries(bdir: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(bdir, "entries.jsonl"), "rb") as f:
            lines = [ln for ln in f.read().split(b"\n") if ln]
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in lines]

