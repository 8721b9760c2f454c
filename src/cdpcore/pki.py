"""pki: the small certificate authority replication runs on.

`init()` writes, into one directory, a CA (``ca.pem``/``ca.key``), the
receiver's certificate (``server.pem``/``server.key``, SAN: localhost,
127.0.0.1, ::1 and the extra host names given) and one client certificate
per source (``NAME.pem``/``NAME.key``: subject CN = NAME, the source's name
in the vault). `issue()` adds more with an existing CA. Keys are EC P-256,
written 0600 with O_EXCL so that a key never exists, even for a moment,
with wider permissions; nothing existing is overwritten unless asked.

The CN is the *only* thing naming a source on the wire (a frame has no
source field), so the names allowed here are those the receiver accepts
as a vault directory name: `[A-Za-z0-9._-]{1,64}`, not ``.`` or ``..``.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdpcore.errors import AuthError

DEFAULT_DAYS = 825  # the longest validity common TLS clients accept for a leaf
CA_DAYS_FACTOR = 4  # the CA outlives the certificates it signs
SERVER = "server"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def check_source_name(name: str) -> str:
    """`name` if it may name a source (a certificate CN, a vault directory);
    ValueError otherwise."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid source name {name!r}: expected 1-64 of A-Z a-z 0-9 . _ -, "
                         f"not '.' or '..'")
    return name


@dataclass(frozen=True)
class Authority:
    """A loaded CA: what signing needs."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    if force:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    # O_EXCL + the mode at creation: a key is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_free(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if os.path.lexists(p)]
    if existing:
        raise AuthError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _new_ca(days: int) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdpcore replication CA")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of the two sites differ
            .not_valid_after(now + datetime.timedelta(days=days * CA_DAYS_FACTOR))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Authority(cert, key)


def _hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*_DEFAULT_HOSTS, *hosts]):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _leaf(ca: Authority, cn: str, days: int, server_hosts: Sequence[str] | None
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca.cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=True, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                        critical=False))
    if server_hosts is not None:
        b = b.add_extension(x509.SubjectAlternativeName(_hosts(server_hosts)), critical=False)
    return b.sign(ca.key, hashes.SHA256()), key


def _check_request(sources: Sequence[str], days: int) -> None:
    for s in sources:
        check_source_name(s)
        if s in ("ca", SERVER):  # their files would collide with the CA's and the server's
            raise ValueError(f"{s!r} is reserved (the CA's and the server's file names), not a source name")
    if days < 1:
        raise ValueError(f"days must be at least 1, got {days}")


def load_authority(directory: str | os.PathLike[str]) -> Authority:
    """The CA in `directory` (ca.pem, ca.key); AuthError if unreadable."""
    d = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise AuthError(f"cannot load the CA from {d}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthError(f"{d / 'ca.key'}: not an EC private key")
    return Authority(cert, key)


def issue(directory: str | os.PathLike[str], *, sources: Sequence[str] = (), server: bool = False,
          hosts: Sequence[str] = (), days: int = DEFAULT_DAYS, force: bool = False) -> list[Path]:
    """Sign more certificates with the CA already in `directory`: one per
    source (NAME.pem/NAME.key) and, with `server`, server.pem/server.key.
    Returns the files written."""
    _check_request(sources, days)
    d = Path(directory)
    names = ([SERVER] if server else []) + list(dict.fromkeys(sources))
    _check_free([d / f"{n}{ext}" for n in names for ext in (".pem", ".key")], force)
    ca = load_authority(d)
    written: list[Path] = []
    for n in names:
        cert, key = _leaf(ca, n, days, list(hosts) if n == SERVER and server else None)
        _write(d / f"{n}.key", _pem_key(key), 0o600, force)
        _write(d / f"{n}.pem", _pem_cert(cert), 0o644, force)
        written += [d / f"{n}.pem", d / f"{n}.key"]
    return written


def init(directory: str | os.PathLike[str], sources: Sequence[str], *, hosts: Sequence[str] = (),
         days: int = DEFAULT_DAYS, force: bool = False) -> list[Path]:
    """A new CA, the server's certificate and one per source in `directory`
    (created if missing). Returns the files written."""
    _check_request(sources, days)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    every = ["ca", SERVER, *dict.fromkeys(sources)]
    _check_free([d / f"{n}{ext}" for n in every for ext in (".pem", ".key")], force)
    ca = _new_ca(days)
    _write(d / "ca.key", _pem_key(ca.key), 0o600, force)
    _write(d / "ca.pem", _pem_cert(ca.cert), 0o644, force)
    return [d / "ca.pem", d / "ca.key",
            *issue(d, sources=sources, server=True, hosts=hosts, days=days, force=force)]


def serial_of(cert_path: str | os.PathLike[str]) -> int:
    """The serial number of a PEM certificate (for a revocation list)."""
    try:
        return x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).serial_number
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read certificate {cert_path}: {e}") from None
