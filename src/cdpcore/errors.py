"""Exceptions of cdpcore. Each carries the exit code cdpctl uses for it
(docs/cli.md), so that the mapping lives in one place."""
from __future__ import annotations


class CdpError(Exception):
    """Base class of every error cdpcore raises on purpose."""

    exit_code = 1


class JournalNotFound(CdpError):
    exit_code = 3


class NotAJournal(CdpError):
    """The path exists but holds no cdpcore journal (or a foreign file)."""

    exit_code = 4


class UnsupportedVersion(NotAJournal):
    """A journal written by a newer format version than this cdpcore reads."""

    exit_code = 4


class CorruptJournal(CdpError):
    """Damage inside the journal; reading stopped at (segment, offset)."""

    exit_code = 5

    def __init__(self, message: str, segment: int | None = None, offset: int | None = None):
        where = ""
        if segment is not None:
            where = f"segment {segment:016x}"
            if offset is not None:
                where += f" offset {offset}"
            where += ": "
        super().__init__(where + message)
        self.segment = segment
        self.offset = offset


class PointError(CdpError):
    """A point in time that cannot be parsed or is not in the journal."""

    exit_code = 6


class RestoreError(CdpError):
    """A restore that cannot start (destination not empty, ...)."""

    exit_code = 7


class JournalExists(CdpError):
    exit_code = 8


class CaptureRunning(CdpError):
    """Rollback refused: a capture of the protected root holds
    JOURNAL/capture.lock (see docs/architecture.md)."""

    exit_code = 13


class CaptureError(CdpError):
    """Capture cannot start: the capture library is missing, the program
    cannot be found, no program was given (docs/capture.md)."""

    exit_code = 14


class ProtocolError(CdpError):
    """The replication peer sent a malformed, oversized or out-of-order
    frame, or refused ours (docs/protocol.md). The connection is closed.

    `code` is the ERROR frame code that tells the peer why: "protocol"
    (malformed or out of order), "limit" (over an announced limit),
    "version" (no common protocol version), or the code of an ERROR frame
    the peer sent."""

    exit_code = 20

    def __init__(self, message: str, code: str = "protocol"):
        super().__init__(message)
        self.code = code


class AuthError(CdpError):
    """TLS or certificate failure: unknown CA, revoked or unmapped
    certificate, a certificate or key file that cannot be read."""

    exit_code = 21


class VaultError(CdpError):
    """The vault refused or cannot store what was asked: another journal
    already bound to this source, a damaged replica, a bad vault directory."""

    exit_code = 22


class LinkError(CdpError):
    """The peer cannot be reached, or the connection was lost and the
    retries ran out (`ship` without --follow gives up after its deadline)."""

    exit_code = 23


class KeyFileError(CdpError):
    """The end-to-end encryption key is missing, unreadable or wrong (an
    encrypted replica cannot be read without it; a wrong key fails the
    AEAD check)."""

    exit_code = 24


class ShipRunning(CdpError):
    """Another `ship` of the same journal is running (it holds
    JOURNAL/ship.lock). Two senders of one source would replace each
    other's connection at the vault over and over."""

    exit_code = 25


class StaleNamespace(CdpError):
    """Internal: another writer changed the namespace; re-encode and retry."""


class NativeError(CdpError):
    """A status code from the C layer that has no more specific class."""
