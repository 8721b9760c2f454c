"""tls: mutual TLS 1.3 for replication, and who the peer is.

Both ends require the other's certificate, signed by the CA given with
``--ca`` (only that CA: the system store is never loaded). The receiver
names the source after its client certificate's subject CN; that is the
only source name on the wire (frames have no source field), so a source's
certificate can touch only ``VAULT/NAME``.

Revocation is a list of serial numbers (``--revoked FILE``, hex, one a
line, ``#`` comments). Python's ssl module has no verification callback,
so the serial is checked right after the handshake, before any frame is
read; the receiver then answers with an ``auth`` error frame and closes.

In TLS 1.3 the client finishes its handshake before the server has
judged the client certificate; a refusal reaches the client as an alert
on its first read. `auth_failure()` recognises those alerts so the sender
can report AuthError (exit 21) instead of a network error it would retry.
"""
from __future__ import annotations

import datetime
import os
import re
import ssl
from pathlib import Path

import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdpcore.errors import AuthError
from cdpcore.pki import check_source_name

DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds a peer gets to finish the TLS handshake

_SERIAL = re.compile(r"(?:0x)?([0-9a-fA-F]{1,40})")
# OpenSSL reason strings meaning "the peer (or we) refused the certificate".
_AUTH_REASONS = ("CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED",
                 "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED", "CERTIFICATE_UNKNOWN",
                 "ACCESS_DENIED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "UNSUPPORTED_CERTIFICATE",
                 "HANDSHAKE_FAILURE")


def _context(purpose: ssl.Purpose, cert: str | os.PathLike[str], key: str | os.PathLike[str],
             ca: str | os.PathLike[str]) -> ssl.SSLContext:
    side = ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    for what, path in (("CA", ca), ("certificate", cert), ("key", key)):
        if not os.access(path, os.R_OK):
            reason = "no such file" if not os.path.exists(path) else "not readable"
            raise AuthError(f"cannot read {what} file {os.fspath(path)}: {reason}")
    _check_certificate(cert, purpose, "certificate")
    _check_certificate(ca, None, "CA")
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise AuthError(f"cannot load CA file {os.fspath(ca)}: {_reason(e)}") from None
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise AuthError(f"cannot load certificate {os.fspath(cert)} with key {os.fspath(key)}: "
                        f"{_reason(e)}") from None
    return ctx


def _check_certificate(path: str | os.PathLike[str], purpose: ssl.Purpose | None, what: str) -> None:
    """Refuse at start what the handshake would refuse later with a vaguer
    message (or, for a server, only when the first client connects): a
    file that is no PEM certificate, a certificate outside its validity,
    one made for the other side (a source's clientAuth certificate given
    to serve, the server's to ship). `purpose` is the peer's purpose, as
    ssl.Purpose names it: CLIENT_AUTH for our server certificate."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            pem = f.read(1 << 20)
        c = x509.load_pem_x509_certificate(pem)
    except OSError as e:
        raise AuthError(f"cannot read {what} file {where}: {e.strerror}") from None
    except ValueError:
        raise AuthError(f"{what} file {where} is not a PEM certificate") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > c.not_valid_after_utc:
        raise AuthError(f"{what} {where} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now < c.not_valid_before_utc:
        raise AuthError(f"{what} {where} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
    if purpose is None:
        return
    want, side = ((ExtendedKeyUsageOID.SERVER_AUTH, "a server (serverAuth)") if purpose is ssl.Purpose.CLIENT_AUTH
                  else (ExtendedKeyUsageOID.CLIENT_AUTH, "a client (clientAuth)"))
    try:
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU: usable for any purpose
    if want not in eku:
        raise AuthError(f"{what} {where} is not {side} certificate; "
                        f"{'serve needs the server' if purpose is ssl.Purpose.CLIENT_AUTH else 'ship needs the source'}'s "
                        "certificate from cdpctl pki")


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                   ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """The receiver's context: TLS 1.3 only, a client certificate from `ca` required."""
    return _context(ssl.Purpose.CLIENT_AUTH, cert, key, ca)


def client_context(cert: str | os.PathLike[str], key: str | os.PathLike[str],
                   ca: str | os.PathLike[str]) -> ssl.SSLContext:
    """The sender's context: TLS 1.3 only, the server's certificate must be
    signed by `ca` and name the host connected to (SAN)."""
    ctx = _context(ssl.Purpose.SERVER_AUTH, cert, key, ca)
    ctx.check_hostname = True
    return ctx


def load_revoked(path: str | os.PathLike[str] | None) -> frozenset[int]:
    """Serial numbers from a revocation file (hex, one a line, '#' comments)."""
    if path is None:
        return frozenset()
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"cannot read revocation list {os.fspath(path)}: {_reason(e)}") from None
    serials = set()
    for n, line in enumerate(lines, 1):
        word = line.split("#", 1)[0].strip().replace(":", "")
        if not word:
            continue
        m = _SERIAL.fullmatch(word)
        if m is None:
            raise AuthError(f"{os.fspath(path)}:{n}: not a hex serial number: {line.strip()!r}")
        serials.add(int(m.group(1), 16))
    return frozenset(serials)


def peer_source(stream: trio.SSLStream[trio.abc.Stream], revoked: frozenset[int] = frozenset()) -> str:
    """The source name a connected client's certificate maps to (its CN).
    AuthError if revoked, without a CN, or with a CN that is not a valid name."""
    der = stream.getpeercert(binary_form=True)
    if not der:  # CERT_REQUIRED makes this unreachable; kept as the last line of defence
        raise AuthError("the client sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    if cert.serial_number in revoked:
        raise AuthError(f"certificate serial {cert.serial_number:x} is revoked")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise AuthError(f"the client certificate has {len(cns)} common names, expected exactly one")
    cn = cns[0].value
    try:
        return check_source_name(cn if isinstance(cn, str) else cn.decode("utf-8", "replace"))
    except ValueError as e:
        raise AuthError(f"client certificate: {e}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return e.verify_message or str(e)
    if isinstance(e, ssl.SSLError):
        return (e.reason or str(e)).lower().replace("_", " ")
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def auth_failure(e: BaseException, side: str) -> AuthError | None:
    """An AuthError if `e` (or what caused it) is a TLS certificate refusal;
    None for an ordinary network failure. `side` names the peer for the
    message ("the server", "the client")."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return AuthError(f"{side}'s certificate is not trusted (--ca): "
                             f"{seen.verify_message or seen.reason}")
        if isinstance(seen, ssl.SSLError) and any(r in (seen.reason or "") for r in _AUTH_REASONS):
            return AuthError(f"TLS refused by {side}: {_reason(seen)} "
                             f"(is our certificate signed by its CA, and not revoked?)")
        seen = seen.__cause__ or seen.__context__
    return None


async def handshake(stream: trio.SSLStream[trio.abc.Stream], timeout: float, side: str) -> None:
    """Finish the TLS handshake within `timeout` seconds. AuthError for a
    refused certificate; trio.BrokenResourceError/TooSlowError otherwise."""
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.BrokenResourceError as e:
        err = auth_failure(e, side)
        if err is not None:
            await _send_alert(stream)
            raise err from None
        raise


def outgoing_bio(stream: trio.SSLStream[trio.abc.Stream]) -> ssl.MemoryBIO | None:
    """The memory BIO into which OpenSSL writes what `stream` sends.

    The only place cdpcore touches a private trio attribute
    (`SSLStream._outgoing`): trio has no public way to reach it, and
    `_send_alert` needs it. Should trio rename it, this returns None and
    only the better refusal message is lost (the peer sees an EOF and
    retries); tests/test_tls.py::test_trio_still_has_the_outgoing_bio
    fails loudly so that it is noticed at the upgrade, not in production.
    """
    bio = getattr(stream, "_outgoing", None)
    return bio if isinstance(bio, ssl.MemoryBIO) else None


async def _send_alert(stream: trio.SSLStream[trio.abc.Stream]) -> None:
    """Send the TLS alert OpenSSL queued when it refused the peer's certificate.

    trio's SSLStream marks itself broken on a handshake error and drops
    what OpenSSL had queued, the alert included, so the peer would see a
    bare EOF and could not tell a refused certificate from a network
    fault: a sender would retry forever instead of failing with exit 21.
    """
    outgoing = outgoing_bio(stream)
    if outgoing is None:
        return
    alert = outgoing.read()
    if alert:
        with trio.move_on_after(1):
            try:
                await stream.transport_stream.send_all(alert)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
