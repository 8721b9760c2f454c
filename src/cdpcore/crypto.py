"""Keys: chunk ids, dedupe keys, the end-to-end key file and its AEAD.

Two kinds of source exist (docs/replication.md, "End-to-end encryption"):

- plaintext sources: chunk ids are BLAKE2b-256 keyed with a *dedupe key*
  the vault generates (per source or per shared domain). The vault can
  recompute every id, so a sender cannot poison its index, and a source
  with another key cannot probe for chunks it does not hold.
- encrypted sources (`ship --encrypt-key FILE`): the key file's 64 random
  bytes are stretched with HKDF-SHA256 into an AES-SIV-512 content key and
  a BLAKE2b id key. The vault never sees either: it stores ciphertext under
  ids it cannot verify or guess from plaintext. AES-SIV is deterministic
  (no nonce), which is what keeps dedupe working: the same plaintext chunk
  always seals to the same ciphertext. Its only leak is equality of chunks,
  which the ids reveal anyway.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cdpcore.errors import KeyFileError

ID_SIZE = 32  # bytes of a chunk id (BLAKE2b-256)
DEDUPE_KEY_SIZE = 32
KEY_FILE_BYTES = 64
SIV_OVERHEAD = 16  # the synthetic IV that AES-SIV prepends to the ciphertext

# HKDF "info" strings: one per derived key, so that no two uses share a key.
_INFO_CONTENT = b"cdpcore e2e v1 content aes-siv-512"
_INFO_IDS = b"cdpcore e2e v1 chunk-id blake2b"
# Associated data bound into every sealed chunk: a ciphertext made by
# another program (or a later format) with the same key does not open here.
_AAD = b"cdpcore chunk v1"


def chunk_id(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The keyed BLAKE2b-256 of a chunk's bytes."""
    return hashlib.blake2b(data, digest_size=ID_SIZE, key=key).digest()


def new_dedupe_key() -> bytes:
    return secrets.token_bytes(DEDUPE_KEY_SIZE)


@dataclass(frozen=True)
class Keys:
    """The keys derived from one end-to-end key file."""

    content: bytes  # 64 bytes: AES-SIV-512 (two AES-256 keys)
    ids: bytes  # 32 bytes: BLAKE2b key of chunk ids

    def __repr__(self) -> str:  # never print key material in a traceback or log
        return "Keys(<secret>)"


KEY_ID_SIZE = 16


def key_id(keys: Keys) -> bytes:
    """A 16-byte public fingerprint of an end-to-end key: the sender sends
    it in HELLO and the vault keeps it, so that a source shipped with
    another key is refused instead of mixing chunks sealed under two keys
    (the replica could then be read with neither). A keyed hash under the
    id key: it reveals nothing about the content key."""
    return hashlib.blake2b(b"cdpcore key id v1", digest_size=KEY_ID_SIZE, key=keys.ids).digest()


def derive_keys(master: bytes) -> Keys:
    if len(master) != KEY_FILE_BYTES:
        raise KeyFileError(f"an end-to-end key is {KEY_FILE_BYTES} bytes, got {len(master)}")

    def hkdf(info: bytes, n: int) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=n, salt=None, info=info).derive(master)

    return Keys(content=hkdf(_INFO_CONTENT, 64), ids=hkdf(_INFO_IDS, 32))


def write_key_file(path: str | os.PathLike[str]) -> Keys:
    """Write a new key file (64 random bytes as one hex line, mode 0600).
    Refuses to overwrite: losing the old key loses every replica sealed
    with it."""
    master = secrets.token_bytes(KEY_FILE_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{os.fspath(path)}: key file exists; refusing to overwrite it") from None
    except OSError as e:
        raise KeyFileError(f"{os.fspath(path)}: cannot create key file: {e.strerror}") from None
    try:
        os.write(fd, master.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return derive_keys(master)


def load_key_file(path: str | os.PathLike[str]) -> Keys:
    """Read a key file; any problem is a KeyFileError naming the file."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * KEY_FILE_BYTES + 2)
    except FileNotFoundError:
        raise KeyFileError(f"{where}: key file not found") from None
    except OSError as e:
        raise KeyFileError(f"{where}: cannot read key file: {e.strerror}") from None
    text = raw.strip()
    if len(text) != 2 * KEY_FILE_BYTES:
        raise KeyFileError(f"{where}: expected one line of {2 * KEY_FILE_BYTES} hex digits, "
                           f"got {len(text)} characters")
    try:
        master = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{where}: not a key file (expected {2 * KEY_FILE_BYTES} hex digits)") from None
    return derive_keys(master)


def seal(keys: Keys, plaintext: bytes | bytearray | memoryview) -> bytes:
    """Deterministic AEAD: the same plaintext under the same keys gives the
    same ciphertext (16-byte SIV + ciphertext of the same length)."""
    return AESSIV(keys.content).encrypt(bytes(plaintext), [_AAD])


def unseal(keys: Keys, ciphertext: bytes | bytearray | memoryview) -> bytes:
    """Open a sealed chunk; a wrong key or any changed byte is a KeyFileError
    (the two cannot be told apart, which is the point of an AEAD)."""
    if len(ciphertext) < SIV_OVERHEAD:
        raise KeyFileError(f"sealed chunk of {len(ciphertext)} bytes is shorter than its tag")
    try:
        return AESSIV(keys.content).decrypt(bytes(ciphertext), [_AAD])
    except InvalidTag:
        raise KeyFileError("sealed chunk does not open: wrong key, or the vault's copy is damaged") from None
