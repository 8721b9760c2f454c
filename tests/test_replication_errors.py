"""What an operator gets wrong, through the real entry point: certificates
of the wrong kind or out of date, bad addresses, a vault replica or a plain
file given as the journal, a wrong end-to-end key, two senders of one
journal, a vault whose disk is full, signals, dedupe domains. Each must end
with one line and the documented exit code (docs/cli.md), never a
traceback, a hang or a damaged replica."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdpcore import Journal, pki
from cdpcore.cli.main import main
from test_replication_cli import CDPCTL, Serve, acked, cdpctl, wait_for
from test_replication_e2e import assert_replica_equals, make_journal


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init(d, ["A", "B", "C"])
    return d


def ship(journal: Path, port: int, certs: Path, name: str = "A", *extra: object) -> list[str]:
    return ["ship", str(journal), "--to", f"127.0.0.1:{port}", "--cert", str(certs / f"{name}.pem"),
            "--key", str(certs / f"{name}.key"), "--ca", str(certs / "ca.pem"), *map(str, extra)]


def serve_args(vault: Path, certs: Path, cert: str = "server") -> list[str]:
    return ["serve", "--vault", str(vault), "--listen", "127.0.0.1:0", "--cert", str(certs / f"{cert}.pem"),
            "--key", str(certs / f"{cert}.key"), "--ca", str(certs / "ca.pem")]


def one_line_error(r: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "cdpctl: error: " in r.stderr and text in r.stderr, r.stderr


def expired_client_cert(certs: Path, out: Path) -> tuple[Path, Path]:
    """A client certificate for A, signed by the CA, that expired yesterday."""
    ca = pki.load_authority(certs)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "A")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    (out / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "old.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return out / "old.pem", out / "old.key"


def test_certificate_mistakes_fail_at_start(tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j = make_journal(tmp_path / "j", 5)
    # (in process: these fail before any socket is opened)
    assert main(serve_args(tmp_path / "v", certs, cert="A")) == 21  # a source's certificate given to serve
    assert "not a server (serverAuth) certificate" in capsys.readouterr().err
    assert main(ship(j, 7443, certs, "server")) == 21  # the server's certificate given to ship
    assert "not a client (clientAuth) certificate" in capsys.readouterr().err
    pem, key = expired_client_cert(certs, tmp_path)
    args = ship(j, 7443, certs)
    assert main([*args[:5], str(pem), "--key", str(key), *args[8:]]) == 21
    assert "expired on" in capsys.readouterr().err
    assert main([*args[:5], str(certs / "A.key"), *args[6:]]) == 21  # a key where the certificate goes
    assert "is not a PEM certificate" in capsys.readouterr().err
    assert main([*args[:7], str(certs / "B.key"), *args[8:]]) == 21  # the key of another certificate
    assert "key values mismatch" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() or not any((tmp_path / "v").iterdir())


def test_bad_addresses_and_names_are_usage_errors(tmp_path: Path, certs: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    j = make_journal(tmp_path / "j", 5)
    args = ship(j, 7443, certs)
    for to in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "[::1]", "host:port"):
        assert main([*args[:3], to, *args[4:]]) == 2, to
    assert main([*args, "--server-name", " "]) == 2
    for cpu in ("0", "-5", "abc", "25 percent", "nan", "7000%"):
        assert main([*args, "--cpu-limit", cpu]) == 2, cpu
    for domain in ("D", "D=", "a/b=A", "D=A,../x", "_x=A"):
        assert main([*serve_args(tmp_path / "v", certs), "--domain", domain]) == 2, domain
    err = capsys.readouterr().err
    assert "Traceback" not in err and "port 0 names no receiver" in err
    assert "expected a percentage of one core" in err


def test_wrong_inputs_against_a_running_vault(tmp_path: Path, certs: Path) -> None:
    """A wrong end-to-end key (refused, the replica stays readable with the
    right one), a vault replica or a plain file as the journal, status of
    a directory that is not a vault, a source outside a dedupe domain."""
    src = make_journal(tmp_path / "j", 60)
    plain = make_journal(tmp_path / "p", 30, seed=3)
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    assert main(["pki", "key", str(k1)]) == 0 and main(["pki", "key", str(k2)]) == 0
    vault = tmp_path / "vault"
    serve = Serve(vault, certs)
    try:
        assert cdpctl(*ship(src, serve.port, certs, "A", "--encrypt-key", k1)).returncode == 0
        # the same source, another key: refused before a byte is written
        one_line_error(cdpctl(*ship(src, serve.port, certs, "A", "--encrypt-key", k2)), 24,
                       "another end-to-end key")
        one_line_error(cdpctl("info", vault / "A", "--encrypt-key", k2), 24, "wrong key")
        r = cdpctl("verify", vault / "A", "--encrypt-key", k1)
        assert r.returncode == 0, r.stdout + r.stderr
        # a vault replica is not a journal to ship (it would append to itself)
        assert cdpctl(*ship(plain, serve.port, certs, "B")).returncode == 0
        one_line_error(cdpctl(*ship(vault / "B" / "journal", serve.port, certs, "B")), 22, "is a vault replica")
        one_line_error(cdpctl(*ship(certs / "ca.pem", serve.port, certs, "B")), 4, "not a journal")
        one_line_error(cdpctl("status", "--vault", certs), 22, "not a vault")
        # a domain the vault does not list this source in
        one_line_error(cdpctl(*ship(plain, serve.port, certs, "C", "--dedupe-domain", "D")), 22,
                       "not in dedupe domain 'D'")
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err
    assert_replica_equals(plain, vault, name="B", points=0)


def test_dedupe_domain_through_the_cli(tmp_path: Path, certs: Path) -> None:
    """Two sources in one domain holding the same data: the second ships a
    fraction of the first's wire bytes; a source not listed is refused."""
    a = make_journal(tmp_path / "a", 150, seed=5)
    b = make_journal(tmp_path / "b", 150, seed=5)  # the same records, another journal
    vault = tmp_path / "vault"
    serve = Serve(vault, certs, "--domain", "D=A,B")
    try:
        ra = cdpctl(*ship(a, serve.port, certs, "A", "--dedupe-domain", "D", "--json"))
        rb = cdpctl(*ship(b, serve.port, certs, "B", "--dedupe-domain", "D", "--json"))
        assert ra.returncode == 0 and rb.returncode == 0, ra.stderr + rb.stderr
        wa, wb = json.loads(ra.stdout)["wire_bytes"], json.loads(rb.stdout)["wire_bytes"]
        assert wb < wa / 4, (wa, wb)
        one_line_error(cdpctl(*ship(b, serve.port, certs, "C", "--dedupe-domain", "D")), 22,
                       "not in dedupe domain")
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err
    for name in ("A", "B"):
        r = cdpctl("verify", vault / name / "journal")
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_second_ship_of_the_same_journal_fails_at_once(tmp_path: Path, certs: Path) -> None:
    src = make_journal(tmp_path / "j", 40)
    with Journal.open(src, readonly=True) as j:
        last = j.last_seq
    serve = Serve(tmp_path / "vault", certs)
    first = subprocess.Popen([*CDPCTL, *ship(src, serve.port, certs, "A", "--follow", "--quiet")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: acked(src) == last, "the first sender to catch up")
        r = cdpctl(*ship(src, serve.port, certs))
        one_line_error(r, 25, f"another ship of this journal is running (pid {first.pid}")
        assert json.loads((src / "replication.json").read_text())["pid"] == first.pid  # not overwritten
        first.send_signal(signal.SIGINT)  # Ctrl-C: finish cleanly
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and "Traceback" not in err
        # the lock went with the process: shipping again works
        r = cdpctl(*ship(src, serve.port, certs))
        assert r.returncode == 0, r.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        serve.stop()


def test_sigint_mid_stream(tmp_path: Path, certs: Path) -> None:
    """Ctrl-C once: ship finishes what is in flight and exits 0; twice: 130
    at once. serve on Ctrl-C: 0. Never a traceback; the replica verifies."""
    src = make_journal(tmp_path / "j", 300)
    vault = tmp_path / "vault"
    serve = Serve(vault, certs)
    try:
        for twice in (False, True):
            p = subprocess.Popen([*CDPCTL, *ship(src, serve.port, certs, "A", "--rate", "100KB")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            before = acked(src)
            wait_for(lambda: acked(src) > before or p.poll() is not None, "acks")
            p.send_signal(signal.SIGINT)
            if twice:
                p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=60)
            assert "Traceback" not in err, err
            assert p.returncode in ((0, 130) if twice else (0,)), (p.returncode, err)
    finally:
        code, err = serve.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in err, err
    r = cdpctl("verify", vault / "A" / "journal")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs")
def test_full_vault_disk_ends_with_give_up(tmp_path: Path, certs: Path) -> None:
    """A vault whose disk is full answers `storage`; the sender retries (the
    disk may be freed) but --give-up still ends it: journal.json, acked
    again on every connection, is not progress."""
    src = make_journal(tmp_path / "j", 300)
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        serve = Serve(disk / "vault", certs)
        try:
            r = cdpctl(*ship(src, serve.port, certs, "A", "--give-up", "2"))
            one_line_error(r, 23, "no progress for 2 s")
            assert "full" in r.stderr
        finally:
            code, err = serve.stop()
        assert code == 0 and "Traceback" not in err, err
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_server_name_overrides_the_host_checked(tmp_path: Path, certs: Path) -> None:
    """--server-name is the name the server's certificate must carry, for a
    DR site reached by an address its certificate does not list."""
    src = make_journal(tmp_path / "j", 10)
    serve = Serve(tmp_path / "vault", certs)
    try:
        one_line_error(cdpctl(*ship(src, serve.port, certs, "A", "--server-name", "dr.elsewhere.example")), 21,
                       "dr.elsewhere.example")
        r = cdpctl(*ship(src, serve.port, certs, "A", "--server-name", "localhost"))
        assert r.returncode == 0, r.stderr
    finally:
        serve.stop()
