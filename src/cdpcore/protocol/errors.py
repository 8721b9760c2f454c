"""Error codes of the replication protocol: the `code` of an ERROR frame and
of a `ProtocolError` (docs/protocol.md, "Errors").

The exception class itself is `cdpcore.errors.ProtocolError` (exit code 20),
so that cdpctl maps every error to its exit code in one place; this module
only names the codes and builds the message text, so that every protocol
error reads the same way: "<frame> frame, field '<name>': <what is wrong>".
"""
from __future__ import annotations

import re
from typing import NoReturn

from ..errors import ProtocolError

__all__ = ["ProtocolError", "ERROR_CODES", "LOCAL_CODES", "fail", "short"]

# Codes a peer may put in an ERROR frame. Receivers accept any token of the
# same shape (a newer peer may know more reasons), see `ERROR_CODE_RE`.
ERROR_CODES = frozenset({"version", "auth", "uuid", "key", "protocol", "limit", "storage", "internal"})
# Codes the protocol layer itself raises; the others come from the transport
# (auth), the vault (uuid, key: another end-to-end key, storage) or a bug
# (internal).
LOCAL_CODES = frozenset({"protocol", "limit", "version"})
ERROR_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def short(value: object) -> str:
    """A value for an error message: repr, cut so that one line stays short
    (a 1 MiB bin in a message would be a denial of service of the log)."""
    text = repr(value)
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) > 16:
        return f"<{len(value)} bytes>"
    return text if len(text) <= 60 else text[:57] + "..."


def fail(where: str, message: str, code: str = "protocol") -> NoReturn:
    """Raise the one-line ProtocolError: `where` names the frame (and field)."""
    raise ProtocolError(f"{where}: {message}" if where else message, code=code)
