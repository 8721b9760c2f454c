"""How the transport's task groups report failure.

trio nurseries raise ExceptionGroups (strict groups); the loops want the
one error that explains why a connection ended. `first_cause()` picks it:
an error that retrying cannot fix (a cdpcore error: protocol, auth, vault)
before a network failure, a network failure before a timeout; a
`trio.Cancelled` only when nothing else is there (it is what the sibling
tasks got when one of them failed).
"""
from __future__ import annotations

import trio

from cdpcore.errors import CdpError


def leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in leaves(sub)]
    return [e]


def _rank(e: BaseException) -> int:
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return 0
    if isinstance(e, CdpError) or type(e).__name__ == "_Fatal":
        return 1
    if isinstance(e, trio.Cancelled):
        return 9
    if isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        return 3
    if isinstance(e, trio.TooSlowError):
        return 4
    return 2  # a bug: keep it visible


def first_cause(e: BaseException) -> BaseException:
    """The leaf of `e` that best explains the failure (module docstring)."""
    return min(leaves(e), key=_rank)
