"""The only importer of the cffi extension cdpcore._cdp.

C functions return status codes; check() maps them to exceptions in this one
place, with C's own message text (cdp_strerror) and errno for system calls.
"""
from __future__ import annotations

import os
from typing import Any

from cdpcore import _cdp  # type: ignore[attr-defined]
from cdpcore.errors import CorruptJournal, NativeError, StaleNamespace

ffi: Any = _cdp.ffi
lib: Any = _cdp.lib

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1


def check(status: int, what: str = "") -> None:
    """Raise the exception that matches a C status; return on CDP_OK."""
    if status == lib.CDP_OK:
        return
    prefix = f"{what}: " if what else ""
    if status == lib.CDP_EIO:
        err = ffi.errno
        raise OSError(err, prefix + os.strerror(err))
    message = prefix + ffi.string(lib.cdp_strerror(status)).decode()
    if status == lib.CDP_ESTALE:
        raise StaleNamespace(message)
    if status == lib.CDP_ECORRUPT:
        raise CorruptJournal(message)
    if status == lib.CDP_ENOMEM:
        raise MemoryError(message)
    raise NativeError(message)


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    return int(lib.cdp_crc32c(crc, ffi.from_buffer(data), len(data)))


def fill_crcs(buf: bytearray) -> int:
    """Fill in the checksum of every record in buf (whole records) and
    return the CRC32C of the checksums (cdp_fill_crcs); ValueError if buf
    does not hold whole, well-formed records."""
    digest = ffi.new("uint32_t *")
    if lib.cdp_fill_crcs(ffi.from_buffer(buf), len(buf), digest) != lib.CDP_OK:
        raise ValueError("not a run of whole records")
    return int(digest[0])


def columns_encode(lit: bytes | bytearray | memoryview, literal_below: int, with_crcs: bool) -> bytes | None:
    """lit (record headers, each followed by its literal bytes) as planar
    columns (cdp_columns_encode); None when lit does not parse as that."""
    cap = 2 * len(lit) + 9
    out = ffi.new("uint8_t[]", cap)
    size = ffi.new("uint64_t *")
    status = lib.cdp_columns_encode(ffi.from_buffer(lit), len(lit), literal_below, int(with_crcs), out, cap, size)
    if status == lib.CDP_EINVAL:
        return None
    check(status, "columns")
    return bytes(ffi.buffer(out, size[0]))


def columns_decode(buf: bytes | bytearray | memoryview, lit_len: int) -> tuple[bytes, int, int] | None:
    """The inverse of columns_encode over the start of buf: (the literal
    column of lit_len bytes, bytes of buf used, the CRC32C of the left-out
    CRCs or 0); None when buf is not a planar layout that fits lit_len."""
    lit = ffi.new("uint8_t[]", max(lit_len, 1))
    used = ffi.new("uint64_t *")
    digest = ffi.new("uint32_t *")
    if lib.cdp_columns_decode(ffi.from_buffer(buf), len(buf), lit, lit_len, used, digest) != lib.CDP_OK:
        return None
    return bytes(ffi.buffer(lit, lit_len)), int(used[0]), int(digest[0])


def crc32c_hw() -> bool:
    return bool(lib.cdp_crc32c_hw())


def now_us() -> int:
    return int(lib.cdp_now_us())
