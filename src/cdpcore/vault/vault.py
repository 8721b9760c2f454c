"""The vault: the receiver's directory of replicas, one per source.

`VAULT/vault.json` marks the directory (so that `serve` pointed at the
wrong place refuses instead of scattering files); `VAULT/NAME/source.json`
binds a source name to its journal UUID at first use, durably, so that a
source cannot overwrite its replica with another journal by mistake. Each
source gets its own dedupe key, or shares its domain's
(`VAULT/_domains/DOMAIN/`) when the vault lists it in that domain.
"""
from __future__ import annotations

import json
import os
import uuid as uuidlib
from typing import Any

from cdpcore._native import now_us
from cdpcore.crypto import new_dedupe_key
from cdpcore.errors import KeyFileError, VaultError
from cdpcore.journal import read_json
from cdpcore.vault.chunkindex import ChunkIndex, open_index
from cdpcore.vault.replica import JOURNAL_DIR, Replica, valid_name, write_durable

VAULT_META = "vault.json"
VAULT_FORMAT = "cdpcore-vault"
VAULT_VERSION = 1
SOURCE_META = "source.json"
DOMAINS_DIR = "_domains"
DOMAIN_META = "domain.json"


class Vault:
    """A vault directory. `domains` maps a domain name to the sources the
    vault lets share it (`serve --domain NAME=SRC,SRC`)."""

    def __init__(self, path: str | os.PathLike[str], create: bool = False,
                 domains: dict[str, list[str]] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.domains = {k: list(v) for k, v in (domains or {}).items()}
        for d, members in self.domains.items():
            if not valid_name(d) or d.startswith("_"):
                raise VaultError(f"domain name {d!r} is not valid ([A-Za-z0-9._-]{{1,64}}, not starting with _)")
            for m in members:
                if not valid_name(m):
                    raise VaultError(f"domain {d}: source name {m!r} is not valid")
        meta = os.path.join(self.path, VAULT_META)
        if create and not os.path.exists(meta):
            if os.path.exists(self.path) and (not os.path.isdir(self.path) or os.listdir(self.path)):
                raise VaultError(f"{self.path} exists and is neither a vault nor an empty directory")
            os.makedirs(self.path, exist_ok=True)
            doc = {"format": VAULT_FORMAT, "version": VAULT_VERSION, "created_us": now_us()}
            write_durable(meta, json.dumps(doc, sort_keys=True).encode())
        try:
            with open(meta, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            raise VaultError(f"{self.path}: not a vault (no {VAULT_META}; create one with serve --init)") from None
        except (OSError, ValueError) as e:
            raise VaultError(f"{meta}: unreadable: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != VAULT_FORMAT:
            raise VaultError(f"{self.path}: not a vault ({VAULT_META} has no {VAULT_FORMAT} tag)")
        if not isinstance(doc.get("version"), int) or doc["version"] > VAULT_VERSION:
            raise VaultError(f"{self.path}: vault format version {doc.get('version')!r}; this cdpcore "
                             f"reads up to {VAULT_VERSION}")
        self._indexes: dict[str, ChunkIndex] = {}

    # ---- sources -------------------------------------------------------------------

    def sources(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path)
                      if valid_name(n) and os.path.isfile(os.path.join(self.path, n, SOURCE_META)))

    def source_meta(self, name: str) -> dict[str, Any] | None:
        path = os.path.join(self.path, name, SOURCE_META)
        doc = read_json(path, VaultError, "source description")
        if doc is None:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("uuid"), str):
            raise VaultError(f"{path}: not a source description")
        return doc

    def open_source(self, name: str, journal_uuid: bytes, encrypted: bool, domain: str | None = None,
                    key_id: bytes | None = None) -> Replica:
        """The replica of source `name` (the client certificate's CN), bound
        to journal_uuid at first use. Refuses another uuid, a change of
        encryption, and a domain the vault does not list the source in.
        An encrypted source is also bound to its key's fingerprint
        (crypto.key_id) the first time one is sent: another key is a
        KeyFileError, since chunks sealed under two keys make a replica no
        key can read."""
        if not valid_name(name):
            raise VaultError(f"source name {name!r} is not valid ([A-Za-z0-9._-]{{1,64}}, not . or ..)")
        if not isinstance(journal_uuid, bytes) or len(journal_uuid) != 16:
            raise VaultError("journal uuid must be 16 bytes")
        if domain is not None:
            if domain not in self.domains or name not in self.domains[domain]:
                raise VaultError(f"source {name} is not in dedupe domain {domain!r} on this vault "
                                 f"(serve --domain {domain}=...,{name})")
            if encrypted:
                raise VaultError(f"source {name}: an encrypted source cannot join a dedupe domain "
                                 "(its chunk ids are keyed with its own key)")
        sdir = os.path.join(self.path, name)
        doc = self.source_meta(name)
        want = str(uuidlib.UUID(bytes=journal_uuid))
        if doc is None:
            os.makedirs(sdir, exist_ok=True)
            doc = {"uuid": want, "encrypted": bool(encrypted), "domain": domain,
                   "key_id": key_id.hex() if encrypted and key_id is not None else None,
                   "dedupe_key": None if encrypted else new_dedupe_key().hex(), "created_us": now_us()}
            write_durable(os.path.join(sdir, SOURCE_META), json.dumps(doc, sort_keys=True).encode())
        else:
            if doc["uuid"] != want:
                raise VaultError(f"source {name} is bound to journal {doc['uuid']}; refusing journal {want} "
                                 "(a different journal under the same name would overwrite the replica)")
            if bool(doc.get("encrypted")) != bool(encrypted):
                raise VaultError(f"source {name} was replicated {'with' if doc.get('encrypted') else 'without'} "
                                 "end-to-end encryption; it cannot change")
            held = doc.get("key_id")
            if encrypted and key_id is not None and held is not None and held != key_id.hex():
                raise KeyFileError(f"source {name} was shipped with another end-to-end key (fingerprint "
                                   f"{held[:16]}, this key's is {key_id.hex()[:16]}): pass the key file it was "
                                   "first shipped with")
            changed = False
            if doc.get("domain") != domain:
                doc["domain"] = domain  # joining or leaving a domain only changes where dedupe looks
                changed = True
            if encrypted and key_id is not None and held is None:
                doc["key_id"] = key_id.hex()  # a vault from before fingerprints: bind it now
                changed = True
            if changed:
                write_durable(os.path.join(sdir, SOURCE_META), json.dumps(doc, sort_keys=True).encode())
        if encrypted:
            key = None
            index = self._index(sdir)
        elif domain is not None:
            ddir = os.path.join(self.path, DOMAINS_DIR, domain)
            key = self._domain_key(ddir)
            index = self._index(ddir)
        else:
            key = bytes.fromhex(doc["dedupe_key"])
            index = self._index(sdir)
        return Replica(name, sdir, journal_uuid, bool(encrypted), key, index, self.path)

    def _index(self, directory: str) -> ChunkIndex:
        idx = self._indexes.get(directory)
        if idx is None:
            idx = self._indexes[directory] = open_index(directory)
        return idx

    def _domain_key(self, ddir: str) -> bytes:
        path = os.path.join(ddir, DOMAIN_META)
        try:
            with open(path, "rb") as f:
                return bytes.fromhex(json.loads(f.read())["dedupe_key"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VaultError(f"{path}: unreadable: {e}") from None
        os.makedirs(ddir, exist_ok=True)
        key = new_dedupe_key()
        write_durable(path, json.dumps({"dedupe_key": key.hex()}).encode())
        return key

    # ---- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `cdpctl status --vault` shows, from the disk only (it does not
        open replicas for writing, so it works beside a running serve)."""
        out: dict[str, Any] = {"vault": self.path, "sources": {}}
        for name in self.sources():
            doc = self.source_meta(name) or {}
            sdir = os.path.join(self.path, name)
            entry: dict[str, Any] = {"uuid": doc.get("uuid"), "encrypted": bool(doc.get("encrypted")),
                                     "domain": doc.get("domain"), "bytes": _tree_bytes(sdir)}
            segdir = os.path.join(sdir, JOURNAL_DIR, "segments")
            if os.path.isdir(segdir):
                segs = sorted(n for n in os.listdir(segdir) if n.endswith(".seg"))
                entry["segments"] = len(segs)
                entry["last_segment"] = segs[-1][:-4] if segs else None
            try:
                with open(os.path.join(sdir, "state.json"), "rb") as f:
                    entry["replication"] = json.loads(f.read())
            except (OSError, ValueError):
                pass
            out["sources"][name] = entry
        return out

    def close(self) -> None:
        for idx in self._indexes.values():
            idx.close()
        self._indexes.clear()

    def __enter__(self) -> "Vault":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tree_bytes(top: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for fn in files:
            try:
                total += os.lstat(os.path.join(dirpath, fn)).st_size
            except OSError:
                pass
    return total
