"""pki (cdpctl pki), TLS contexts and the certificate -> source mapping,
over real TLS on real loopback sockets; --rate parsing, pacing and backoff."""
from __future__ import annotations

import os
import random
import ssl
import stat
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from cdpcore import pki
from cdpcore.cli.main import main
from cdpcore.errors import AuthError
from cdpcore.transport import tls
from cdpcore.transport.rate import Backoff, TokenBucket, parse_rate


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init(d, ["A", "B", "rev"], hosts=["dr.example"])
    return d


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki2")
    pki.init(d, ["A"])
    return d


# ---- pki ----------------------------------------------------------------------------


def test_pki_init_writes_keys_0600_and_named_certificates(certs: Path) -> None:
    for name in ("ca", "server", "A", "B", "rev"):
        assert stat.S_IMODE(os.stat(certs / f"{name}.key").st_mode) == 0o600
    a = x509.load_pem_x509_certificate((certs / "A.pem").read_bytes())
    assert a.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "A"
    assert a.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "dr.example"}
    assert {str(i) for i in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    a.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)


def test_pki_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    pki.init(tmp_path, ["A"])
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(AuthError, match="refusing to overwrite"):
        pki.init(tmp_path, ["A"])
    with pytest.raises(AuthError, match="refusing to overwrite"):
        pki.issue(tmp_path, sources=["A"])
    assert (tmp_path / "ca.pem").read_bytes() == before
    pki.issue(tmp_path, sources=["C"])  # a new name with the existing CA
    x509.load_pem_x509_certificate((tmp_path / "C.pem").read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(before))
    pki.init(tmp_path, ["A"], force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x" * 65, "ca", "server", "é", "a b"])
def test_pki_refuses_bad_source_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        pki.init(tmp_path, [name])
    assert list(tmp_path.iterdir()) == []


def test_cdpctl_pki_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "p")
    assert main(["pki", "init", d, "--source", "A", "--host", "10.0.0.9"]) == 0
    assert main(["pki", "init", d, "--source", "A"]) == 21
    assert main(["pki", "init", d]) == 2
    assert main(["pki", "add", d, "--source", "../etc"]) == 2
    assert main(["pki", "add", str(tmp_path / "nothing"), "--source", "Z"]) == 21
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("cdpctl: error:") == 4


# ---- TLS over loopback --------------------------------------------------------------


async def _pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "127.0.0.1",
                revoked: frozenset[int] = frozenset()) -> tuple[object, object]:
    """Handshake both ends over a real TCP connection; returns what each side
    got: the source name / None, or the exception."""
    results: dict[str, object] = {}
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve() -> None:
        sock = await listeners[0].accept()
        s = trio.SSLStream(sock, server_ctx, server_side=True)
        try:
            await tls.handshake(s, 5, "the client")
            results["server"] = tls.peer_source(s, revoked)
            await s.send_all(b"ok")
        except (AuthError, trio.BrokenResourceError) as e:
            results["server"] = e
        finally:
            await trio.aclose_forcefully(s)

    async def connect() -> None:
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        s = trio.SSLStream(sock, client_ctx, server_hostname=host)
        try:
            await tls.handshake(s, 5, "the server")
            data = await s.receive_some(10)
            results["client"] = data if data else EOFError("closed")
        except trio.BrokenResourceError as e:
            results["client"] = tls.auth_failure(e, "the server") or e
        except AuthError as e:
            results["client"] = e
        finally:
            await trio.aclose_forcefully(s)

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        n.start_soon(connect)
    await listeners[0].aclose()
    return results["server"], results["client"]


def _server(d: Path) -> ssl.SSLContext:
    return tls.server_context(d / "server.pem", d / "server.key", d / "ca.pem")


def _client(d: Path, name: str, ca: Path | None = None) -> ssl.SSLContext:
    return tls.client_context(d / f"{name}.pem", d / f"{name}.key", ca or d / "ca.pem")


@pytest.mark.trio
async def test_mutual_tls_names_the_source_by_cn(certs: Path) -> None:
    server, client = await _pair(_server(certs), _client(certs, "B"))
    assert server == "B" and client == b"ok"
    server, client = await _pair(_server(certs), _client(certs, "A"), host="localhost")
    assert server == "A"


@pytest.mark.trio
async def test_client_certificate_from_another_ca_is_refused_on_both_sides(certs: Path, other_ca: Path) -> None:
    server, client = await _pair(_server(certs), _client(other_ca, "A", ca=certs / "ca.pem"))
    assert isinstance(server, AuthError) and "not trusted" in str(server)
    assert isinstance(client, AuthError) and "refused by the server" in str(client)


@pytest.mark.trio
async def test_server_certificate_from_another_ca_is_refused_by_the_client(certs: Path, other_ca: Path) -> None:
    server, client = await _pair(_server(other_ca), _client(certs, "A"))
    assert isinstance(client, AuthError) and "not trusted" in str(client)
    assert isinstance(server, (AuthError, trio.BrokenResourceError))


def test_trio_still_has_the_outgoing_bio(certs: Path) -> None:
    """tls.outgoing_bio() reads trio's private SSLStream._outgoing (to send
    the alert of a refused certificate). If a trio upgrade renames it, fail
    here, not silently in production (refusals would look like network
    faults and senders would retry instead of exiting 21)."""
    a, _ = trio.testing.memory_stream_pair()
    stream = trio.SSLStream(a, _client(certs, "A"), server_hostname="localhost")
    assert isinstance(tls.outgoing_bio(stream), ssl.MemoryBIO), f"trio {trio.__version__} changed SSLStream"


@pytest.mark.trio
async def test_server_name_must_match(certs: Path) -> None:
    _, client = await _pair(_server(certs), _client(certs, "A"), host="elsewhere.example")
    assert isinstance(client, AuthError) and "elsewhere.example" in str(client)


@pytest.mark.trio
async def test_revoked_serial_is_refused(certs: Path, tmp_path: Path) -> None:
    f = tmp_path / "revoked"
    f.write_text(f"# revoked\n{pki.serial_of(certs / 'rev.pem'):x}\n\n")
    revoked = tls.load_revoked(f)
    server, _ = await _pair(_server(certs), _client(certs, "rev"), revoked=revoked)
    assert isinstance(server, AuthError) and "revoked" in str(server)
    server, _ = await _pair(_server(certs), _client(certs, "A"), revoked=revoked)
    assert server == "A"


def test_revocation_list_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="cannot read revocation list"):
        tls.load_revoked(tmp_path / "none")
    (tmp_path / "bad").write_text("12ab\nzz-top\n")
    with pytest.raises(AuthError, match=r"bad:2: not a hex serial"):
        tls.load_revoked(tmp_path / "bad")
    (tmp_path / "ok").write_text("0x1F  # a comment\n1f:20\n")
    assert tls.load_revoked(tmp_path / "ok") == {0x1F, 0x1F20}


def test_unreadable_or_mismatched_files_are_auth_errors(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="cannot read CA file .*no such file"):
        tls.server_context(certs / "server.pem", certs / "server.key", tmp_path / "nope.pem")
    with pytest.raises(AuthError, match="cannot load certificate"):
        tls.client_context(certs / "A.pem", certs / "B.key", certs / "ca.pem")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(AuthError, match="CA file .*garbage.pem is not a PEM certificate"):
        tls.client_context(certs / "A.pem", certs / "A.key", tmp_path / "garbage.pem")


# ---- rate, pacing, backoff ----------------------------------------------------------


@pytest.mark.parametrize("text,value", [("10mbit", 1.25e6), ("500kbit", 62500), ("1.5MB", 1.5e6),
                                        ("2MiB/s", 2 * 1024**2), ("8bit", 1), ("1GB", 1e9),
                                        ("unlimited", None)])
def test_parse_rate(text: str, value: float | None) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["10", "10Mb", "10mbps", "0mbit", "-1MB", "fast", "1e400MB", ""])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@given(rate=st.integers(1000, 10**7), writes=st.lists(st.integers(1, 200_000), min_size=1, max_size=30))
def test_token_bucket_keeps_the_average_rate(rate: int, writes: list[int]) -> None:
    """Model: after writes totalling N bytes, at least (N - last - burst) / rate
    seconds have passed (the last write's debt is paid by the next one) and
    no more than N / rate (it never waits when it has no debt)."""
    async def run() -> float:
        bucket = TokenBucket(rate)
        start = trio.current_time()
        for n in writes:
            await bucket.take(n)
        return trio.current_time() - start, bucket.burst

    elapsed, burst = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    total = sum(writes)
    assert elapsed >= (total - writes[-1] - burst) / rate - 1e-9
    assert elapsed <= max(0.0, (total - writes[-1]) / rate) + 1e-9


def test_backoff_grows_is_capped_and_resets_after_a_healthy_period() -> None:
    b = Backoff(initial=0.5, cap=8, healthy=60, rng=random.Random(1))
    delays = [b.failed(now=float(i)) for i in range(12)]
    assert all(0.5 <= d <= 8 for d in delays)
    assert max(delays[6:]) > 2  # it did grow
    b.connected(100.0)
    b.failed(110.0)  # up only 10 s: still backing off
    assert b.attempts == 13
    b.connected(200.0)
    assert b.failed(300.0) == 0.5 and b.attempts == 1  # up 100 s: starts again
