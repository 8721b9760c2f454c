"""Replication through the real entry point: `cdpctl serve` and `cdpctl
ship` as subprocesses, killed with SIGKILL mid-stream and restarted (the
replica then verifies and equals the source), SIGTERM for a clean stop,
`cdpctl status`, and the exit codes of the failures an operator meets."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdpcore import Journal, pki
from cdpcore.cli.main import main
from conftest import scale
from test_replication_e2e import assert_replica_equals, make_journal

CDPCTL = [sys.executable, "-m", "cdpcore.cli.main"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init(d, ["A"])
    return d


def cdpctl(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDPCTL, *map(str, args)], capture_output=True, text=True, timeout=timeout)


class Serve:
    """`cdpctl serve` on a free port (read from its first log line)."""

    def __init__(self, vault: Path, certs: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*CDPCTL, "serve", "--vault", str(vault), "--listen", "127.0.0.1:0", "--cert", str(certs / "server.pem"),
             "--key", str(certs / "server.key"), "--ca", str(certs / "ca.pem"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def ship_args(journal: Path, port: int, certs: Path, *extra: object) -> list[str]:
    return [*CDPCTL, "ship", str(journal), "--to", f"127.0.0.1:{port}", "--cert", str(certs / "A.pem"),
            "--key", str(certs / "A.key"), "--ca", str(certs / "ca.pem"), *map(str, extra)]


def acked(journal: Path) -> int:
    try:
        return int(json.loads((journal / "replication.json").read_text()).get("acked_seq") or 0)
    except (OSError, ValueError):
        return 0


def wait_for(cond, what: str, limit: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition; the limit is a hang guard, not a timing assertion."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_sigkill_of_sender_and_receiver_mid_stream_then_restart(tmp_path: Path, certs: Path) -> None:
    src = make_journal(tmp_path / "j", scale(800, 6000))
    with Journal.open(src, readonly=True) as j:
        last = j.last_seq
    vault = tmp_path / "vault"
    serve = Serve(vault, certs)
    # a slow rate, so that the kills land mid-stream
    ship = subprocess.Popen(ship_args(src, serve.port, certs, "--rate", "400KB", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: acked(src) > 0, "first acks")
    ship.kill()
    ship.wait()
    assert acked(src) < last
    ship = subprocess.Popen(ship_args(src, serve.port, certs, "--rate", "400KB", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    before = acked(src)
    wait_for(lambda: acked(src) > before, "acks after the sender's restart")
    serve.proc.kill()  # the receiver dies; the sender retries meanwhile
    serve.proc.wait()
    ship.kill()
    ship.wait()
    serve = Serve(vault, certs)
    r = cdpctl(*ship_args(src, serve.port, certs)[len(CDPCTL):], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acked_seq"] == last
    code, err = serve.stop()
    assert code == 0 and "SIGTERM" in err and "Traceback" not in err
    v = cdpctl("verify", vault / "A")
    assert v.returncode == 0, v.stdout + v.stderr
    assert_replica_equals(src, vault, points=2)
    st = json.loads(cdpctl("status", src, "--json").stdout)
    assert st["lag_bytes"] == 0 and st["acked_seq"] == last
    vs = json.loads(cdpctl("status", "--vault", vault, "--json").stdout)
    assert vs["sources"][0]["source"] == "A" and vs["sources"][0]["state"] == "disconnected"


def test_follow_stops_cleanly_on_sigterm(tmp_path: Path, certs: Path) -> None:
    src = make_journal(tmp_path / "j", 100)
    vault = tmp_path / "vault"
    serve = Serve(vault, certs)
    ship = subprocess.Popen(ship_args(src, serve.port, certs, "--follow", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with Journal.open(src, readonly=True) as j:
        last = j.last_seq
    wait_for(lambda: acked(src) == last, "the follower to catch up")
    ship.send_signal(signal.SIGTERM)
    out, err = ship.communicate(timeout=60)
    assert ship.returncode == 0, err
    assert json.loads(out)["state"] == "stopped"
    serve.stop()
    assert_replica_equals(src, vault, points=0)


def test_exit_codes(tmp_path: Path, certs: Path) -> None:
    other = tmp_path / "other-pki"
    pki.init(other, ["A"])
    src = make_journal(tmp_path / "j", 20)
    second = make_journal(tmp_path / "j2", 20, seed=9)
    vault = tmp_path / "vault"
    serve = Serve(vault, certs)
    try:
        args = ship_args(src, serve.port, certs)[len(CDPCTL):]
        assert cdpctl(*args).returncode == 0
        # another journal under the same certificate: the vault refuses it (22)
        r = cdpctl(*ship_args(second, serve.port, certs)[len(CDPCTL):], "--json")
        assert r.returncode == 22 and json.loads(r.stdout)["error"]["type"] == "VaultError"
        # a certificate from another CA (21), on the client's side too
        bad = [a.replace(str(certs / "A."), str(other / "A.")) for a in args]
        r = cdpctl(*bad)
        assert r.returncode == 21 and "refused by the server" in r.stderr
        r = cdpctl(*[a.replace(str(certs / "ca.pem"), str(other / "ca.pem")) for a in args])
        assert r.returncode == 21 and "not trusted" in r.stderr
        # nothing listening (23), a bad rate (2), a missing key file (21)
        r = cdpctl(*args[:3], "127.0.0.1:1", *args[4:], "--give-up", "0.2")
        assert r.returncode == 23
        # (in process: the same main(), without another interpreter start)
        assert main([*args, "--rate", "10Mb"]) == 2
        assert main([a.replace("A.key", "nope.key") for a in args]) == 21
        assert main([*args, "--encrypt-key", str(tmp_path / "none.key")]) == 24
    finally:
        code, err = serve.stop()
    assert code == 0 and "Traceback" not in err
    # a port that is taken
    s1 = Serve(tmp_path / "v2", certs)
    try:
        r = cdpctl("serve", "--vault", tmp_path / "v3", "--listen", f"127.0.0.1:{s1.port}",
                   "--cert", certs / "server.pem", "--key", certs / "server.key", "--ca", certs / "ca.pem")
        assert r.returncode == 10 and "cannot listen" in r.stderr
    finally:
        s1.stop()
    assert main(["status", str(tmp_path / "nothing")]) == 3
    assert main(["status", "--vault", str(tmp_path / "nothing")]) == 22
    assert main(["status"]) == 2


def test_cli_defaults_match_the_modules() -> None:
    from cdpcore import pki as pki_module
    from cdpcore.cli import pki as pki_cli
    from cdpcore.cli import ship as ship_cli
    from cdpcore.transport import shipper

    assert ship_cli.DEFAULT_GIVE_UP == shipper.DEFAULT_GIVE_UP
    assert ship_cli.DEFAULT_CPU_LIMIT == shipper.DEFAULT_CPU_LIMIT
    assert (pki_cli.DEFAULT_DAYS, pki_cli.CA_DAYS_FACTOR) == (pki_module.DEFAULT_DAYS, pki_module.CA_DAYS_FACTOR)
