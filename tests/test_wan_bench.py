"""The WAN benchmark harness (benchmarks/wan/, benchmarks/_wan_bench.py):
the pure parts against simple models, and the real shaped link (network
namespaces, veth, tbf) when the test runs as root with iproute2.

Nothing here asserts on a time: the link tests check bytes, names,
counters and clean-up, not throughput (the benchmark reports that).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import THOROUGH

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# appended, not prepended: benchmarks/conftest.py must not shadow tests/conftest.py
# (spawned processes of other tests inherit sys.path and import `conftest`)
sys.path += [str(BENCH / "wan"), str(BENCH)]

import baselines  # noqa: E402
import netlink  # noqa: E402
from netlink import NetlinkError  # noqa: E402

NETLINK = str(BENCH / "wan" / "netlink.py")
can_netns = (os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None
             and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0)
needs_root = pytest.mark.skipif(not can_netns, reason="needs root and iproute2 (network namespaces)")


# ---- pure parts ------------------------------------------------------------------------


@given(st.integers(1, 10_000), st.sampled_from([("kbit", 10**3), ("mbit", 10**6), ("gbit", 10**9)]))
def test_parse_rate_units(n: int, unit: tuple[str, int]) -> None:
    bits = n * unit[1]
    if bits < 8 * netlink.FRAME * 10:
        with pytest.raises(NetlinkError, match="too low"):
            netlink.parse_rate(f"{n}{unit[0]}")
    else:
        assert netlink.parse_rate(f"{n}{unit[0]}") == bits
        assert netlink.parse_rate(f" {n}{unit[0].upper()} ") == bits


@pytest.mark.parametrize("bad", ["", "10", "10mbps", "10 MB", "-1mbit", "mbit", "1e3mbit", "10mbit,50ms"])
def test_parse_rate_refuses(bad: str) -> None:
    with pytest.raises(NetlinkError) as e:
        netlink.parse_rate(bad)
    assert "\n" not in str(e.value) and "e.g. '10mbit'" in str(e.value)


@given(st.integers(int(1.2e5), 10**10))
def test_tbf_params_hold_a_frame_and_scale(rate: int) -> None:
    p = netlink.tbf_params(rate)
    assert p["burst"] >= 4 * netlink.FRAME  # tbf drops frames bigger than its bucket
    assert p["burst"] >= rate // 8 * 2 // 1000  # 2 ms of traffic: no starving between timer ticks
    assert p["latency_ms"] == netlink.DEFAULT_LATENCY_MS


def _samples(steps: list[tuple[int, int]], period: float = 0.02) -> list[tuple[float, dict[str, int]]]:
    """Counter samples from per-period increments (forward, backward)."""
    out, fwd, back = [], 1000, 500
    out.append((0.0, {"tx_tx_bytes": fwd, "dr_tx_bytes": back, "tx_tx_packets": 0}))
    for i, (f, b) in enumerate(steps, 1):
        fwd, back = fwd + f, back + b
        out.append((i * period, {"tx_tx_bytes": fwd, "dr_tx_bytes": back, "tx_tx_packets": i}))
    return out


@given(st.lists(st.tuples(st.integers(0, 25_000), st.integers(0, 3000)), min_size=1, max_size=200))
def test_utilisation_matches_model(steps: list[tuple[int, int]]) -> None:
    rate, period = 10_000_000, 0.02
    u = netlink.utilisation(_samples(steps, period), rate)
    assert u["wire_bytes"] == sum(f for f, _ in steps)
    assert u["wire_bytes_back"] == sum(b for _, b in steps)
    busy = [i for i, (f, _) in enumerate(steps) if f > 0]
    if not busy:
        assert u["backlog_s"] == 0 and u["link_use"] != u["link_use"]  # nan: no traffic, no figure
        return
    span = (busy[-1] + 1 - busy[0]) * period
    assert u["backlog_s"] == pytest.approx(span)
    assert u["link_use"] == pytest.approx(u["wire_bytes"] * 8 / (rate * span))
    # at most the line rate per period (25,000 B per 20 ms) can never read as more than 100 %
    assert u["link_use"] <= 1.0 + 1e-9


def test_utilisation_needs_two_samples() -> None:
    with pytest.raises(NetlinkError, match="two counter samples"):
        netlink.utilisation(_samples([])[:1], 10_000_000)


NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
cw1234abcdt: 146872    2224    0    0    0     0          0         0  6579098    4357    0    0    0     0       0          0
"""


def test_parse_net_dev() -> None:
    assert netlink.parse_net_dev(NET_DEV, "cw1234abcdt") == {
        "rx_bytes": 146872, "rx_packets": 2224, "tx_bytes": 6579098, "tx_packets": 4357}
    with pytest.raises(NetlinkError, match="cw1234abcdd not found"):
        netlink.parse_net_dev(NET_DEV, "cw1234abcdd")
    with pytest.raises(NetlinkError, match="not found"):
        netlink.parse_net_dev("cw1234abcdt: 1 2 3\n", "cw1234abcdt")  # truncated line: not a count


@pytest.mark.parametrize("name", ["cdpwan-1-abc", "cdpwan-x-abcd", "other-1-abcd", "cdpwan-1-abcd-tx"])
def test_link_names_are_checked(name: str) -> None:
    with pytest.raises(NetlinkError, match="bad link name"):
        netlink.Link.attach(name)


def test_link_interface_names_fit() -> None:
    link = netlink.Link.attach("cdpwan-4194304-beef")  # the largest pid Linux hands out
    assert len(link.tx_if) <= 15 and len(link.dr_if) <= 15 and link.tx_if != link.dr_if


def test_parse_rsync_stats() -> None:
    text = ("Client negotiated compress: zstd\nNumber of regular files transferred: 20\n"
            "Literal data: 2,000,000 bytes\nMatched data: 0 bytes\n"
            "Total bytes sent: 1,039,731\nTotal bytes received: 399\n")
    assert baselines.parse_rsync_stats(text) == {"sent": 1039731, "received": 399, "literal": 2000000,
                                                 "matched": 0, "files_transferred": 20, "compress": "zstd"}
    assert baselines.parse_rsync_stats("")["compress"] == "?"


def netlink_tmp():  # type: ignore[no-untyped-def]
    import tempfile
    return tempfile.TemporaryDirectory(prefix="cdptest-wan-")


def test_measured_child_cpu_is_its_own(tmp_path: Path) -> None:
    """wait4's rusage of a child that burns CPU agrees with what the child
    itself counted (the sender-CPU figure of the benchmark)."""
    import _wan_bench

    prog = ("import time\nt = time.process_time()\nx = 0\n"
            "while time.process_time() - t < 0.2:\n    x += 1\nprint(time.process_time())")
    r = _wan_bench.Measured([sys.executable, "-c", prog], str(tmp_path), "burn").wait(60)
    assert r.returncode == 0
    own = float(r.stdout.strip())
    assert own <= r.cpu_s <= own + 0.5  # the interpreter's start-up is the difference
    assert r.elapsed_s > 0


def test_measured_child_killed_on_timeout(tmp_path: Path) -> None:
    import _wan_bench

    r = _wan_bench.Measured([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path), "s").wait(0.3)
    assert r.returncode == -signal.SIGKILL and "killed after" in r.stderr


# ---- the real link -------------------------------------------------------------------------


def _ours() -> set[str]:
    return {n for n in netlink.namespaces() if n.startswith(netlink.PREFIX + "-")}


def _this_process() -> set[str]:
    """The namespaces of links this process made (names carry the owner's
    pid): another session's benchmark on the same machine may bring its own
    link up or down meanwhile."""
    return {n for n in netlink.namespaces() if n.startswith(f"{netlink.PREFIX}-{os.getpid()}-")}


@needs_root
def test_link_carries_bytes_counts_them_and_goes_away(tmp_path: Path) -> None:
    before = _ours()
    with netlink.shaped_link("10mbit") as link:
        assert {link.tx_ns, link.dr_ns} <= set(netlink.namespaces())
        assert "tbf" in link.qdiscs() and "10Mbit" in link.qdiscs()
        payload = tmp_path / "payload"
        payload.write_bytes(os.urandom(100_000))
        res = netlink.tcp_copy(link, path=str(payload))
        assert res["payload_bytes"] == 100_000
        # every payload byte crossed, in frames of at most 1514 bytes with headers
        assert 100_000 < res["wire_bytes"] < 100_000 * 1.06
        assert res["packets"] >= 100_000 // 1448
        c = link.counters()
        assert c["dr_rx_bytes"] == c["tx_tx_bytes"] and c["tx_rx_bytes"] == c["dr_tx_bytes"]
        assert res["link_use"] > 0
        link.down()
        link.down()  # idempotent
    assert _ours() == before


@needs_root
def test_two_links_at_once_do_not_collide() -> None:
    with netlink.shaped_link("10mbit") as a, netlink.shaped_link("20mbit") as b:
        assert a.name != b.name and a.tx_if != b.tx_if
        ra = netlink.tcp_copy(a, nbytes=50_000)
        rb = netlink.tcp_copy(b, nbytes=20_000)
        assert ra["payload_bytes"] == 50_000 and rb["payload_bytes"] == 20_000
        # each link's counters saw its own transfer only
        assert a.counters()["tx_tx_bytes"] > 50_000 > b.counters()["tx_tx_bytes"] > 20_000


def _wait_for(pred, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@needs_root
def test_cli_run_exports_the_link_and_removes_it() -> None:
    p = subprocess.run([sys.executable, NETLINK, "run", "--", "sh", "-c",
                        'ip netns list | grep -q "^$CDP_WAN_TX_NS" && echo "$CDP_WAN_TX_NS $CDP_WAN_DR_IP"; exit 3'],
                       capture_output=True, text=True)
    assert p.returncode == 3, p.stderr  # the command's own exit code
    ns, ip = p.stdout.split()
    assert ip == netlink.DR_IP and ns.startswith(netlink.PREFIX)
    assert ns not in netlink.namespaces()


@needs_root
def test_cli_run_removes_the_link_on_sigterm() -> None:
    before = _ours()
    p = subprocess.Popen([sys.executable, NETLINK, "run", "--", "sleep", "60"])
    try:
        _wait_for(lambda: len(_ours() - before) == 2, "the link to appear")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _ours() == before


@needs_root
def test_cli_up_belongs_to_the_caller_and_clean_removes_it_after() -> None:
    # `up` from a shell that then exits: the link's owner is gone, so it is stale
    p = subprocess.run(["sh", "-c", f"{sys.executable} {NETLINK} up --rate 10mbit"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    name = json.loads(p.stdout)["name"]
    try:
        assert name in netlink.stale_links()
        c = subprocess.run([sys.executable, NETLINK, "counters", name], capture_output=True, text=True)
        assert c.returncode == 0 and json.loads(c.stdout)["tx_tx_bytes"] >= 0
        cl = subprocess.run([sys.executable, NETLINK, "clean"], capture_output=True, text=True)
        assert f"removed {name}" in cl.stdout
        assert not any(n.startswith(name) for n in netlink.namespaces())
    finally:
        netlink.Link.attach(name).down()


@needs_root
@pytest.mark.parametrize("argv, msg", [
    (["verify", "--rate", "10mbps"], "bad rate '10mbps'"),
    (["verify", "--mib", "0"], "--mib must be at least 1"),
    (["down", "nonsense"], "bad link name"),
    (["counters", "cdpwan-1-abcd"], "cdpwan-1-abcd-tx"),
    (["run"], "no command given"),
])
def test_cli_bad_input_is_one_line(argv: list[str], msg: str) -> None:
    before = _ours()
    p = subprocess.run([sys.executable, NETLINK, *argv], capture_output=True, text=True)
    assert p.returncode == 23
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("netlink: ") and msg in p.stderr
    assert _ours() == before


# ---- lag at the DR site, from the files --------------------------------------------------------


@pytest.fixture(scope="module")
def small_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[tuple[str, int]], list[int]]:
    """A journal of 24 writes with known timestamps over several 4 KiB
    segments, and the (segment, size) after each write: its record ends."""
    from cdpcore import Journal

    d = tmp_path_factory.mktemp("lagj")
    (d / "root").mkdir()
    path = str(d / "journal")
    ends, tss = [], []
    with Journal.create(path, root=str(d / "root"), segment_size=4096) as j:
        j.append_write("f", 0, b"x", ts=1)  # the file's FILEMAP record comes first; not counted
        for i in range(24):
            ts = 1_700_000_000_000_000 + i * 1000
            j.append_write("f", i * 700, bytes([i]) * 700, ts=ts)
            seg = sorted(os.listdir(os.path.join(path, "segments")))[-1]
            ends.append((seg, os.path.getsize(os.path.join(path, "segments", seg))))
            tss.append(ts)
    return path, ends, tss


@given(st.integers(0, 23), st.integers(0, 10**9))
def test_vault_lag_matches_model(small_journal: tuple[str, list[tuple[str, int]], list[int]], k: int,
                                 later: int) -> None:
    """A replica holding the journal up to write k's end is behind by the
    age of write k+1 and by exactly the bytes it lacks."""
    import _wan_bench

    path, ends, tss = small_journal
    src = os.path.join(path, "segments")
    names = sorted(n for n in os.listdir(src) if n.endswith(".seg"))
    seg_k, size_k = ends[k]
    with netlink_tmp() as rep:
        os.makedirs(os.path.join(rep, "segments"))
        held = 0
        for n in names:
            if n > seg_k:
                break
            data = Path(src, n).read_bytes()[: size_k if n == seg_k else None]
            Path(rep, "segments", n).write_bytes(data)
            held += len(data)
        total = sum(os.path.getsize(os.path.join(src, n)) for n in names)
        now = tss[-1] + later
        lag, behind = _wan_bench.vault_lag(path, rep, now)
        assert behind == total - held
        if k == len(tss) - 1:
            assert (lag, behind) == (0.0, 0)
        else:
            assert lag == pytest.approx((now - tss[k + 1]) / 1e6)


def test_vault_lag_ignores_the_preallocated_zero_tail(small_journal: tuple[str, list[tuple[str, int]],
                                                                            list[int]]) -> None:
    """A source segment that ends in zeros past its last record (capture's
    preallocated tail) is not behind a replica that holds every record: the
    zeros are not journal data. (Read as a record, they made the lag the
    age of 1970: 1.8e9 s.)"""
    import shutil
    import _wan_bench

    path, _ends, _tss = small_journal
    with netlink_tmp() as work:
        src = os.path.join(work, "journal")
        shutil.copytree(path, src)
        rep = os.path.join(work, "replica")
        shutil.copytree(os.path.join(path, "segments"), os.path.join(rep, "segments"))
        last = sorted(os.listdir(os.path.join(src, "segments")))[-1]
        with open(os.path.join(src, "segments", last), "ab") as f:
            f.write(bytes(1 << 16))
        assert _wan_bench.vault_lag(src, rep, 2_000_000_000_000_000) == (0.0, 0)


# ---- the whole suite, tiny -----------------------------------------------------------------------


@needs_root
@pytest.mark.slow
@pytest.mark.skipif(not THOROUGH, reason="the whole WAN suite, tiny: ~2 min with PostgreSQL (CDP_TEST_PROFILE=thorough)")
def test_wan_suite_tiny_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The four scenarios on a real link with tiny sizes: every transfer
    measured, every replica byte-equal, a PASS/FAIL line per target, and
    no namespace left behind. PostgreSQL (pg) runs when it is installed,
    and must be when CDP_REQUIRE_POSTGRES=1 (CI)."""
    import _wan_bench
    import pg_util

    if _wan_bench.replication_available() is not None:
        pytest.skip(_wan_bench.replication_available())
    pg_missing = pg_util.missing_reason()
    if pg_missing and os.environ.get(pg_util.REQUIRE_ENV) == "1":
        pytest.fail(f"{pg_util.REQUIRE_ENV}=1 but {pg_missing}")
    for k, v in {"CDP_WL_DB_MB": "1", "CDP_WL_TRANSACTIONS": "20", "CDP_WL_IMAGES": "12",
                 "CDP_WL_IMAGE_SIDE": "64", "CDP_WAN_LAG_SECONDS": "2", "CDP_WAN_PG_SCALE": "1",
                 "CDP_WAN_PG_SECONDS": "2", "CDP_WAN_SCENARIOS": "his,pacs,lag,pg"}.items():
        monkeypatch.setenv(k, v)
    before = _this_process()
    res = _wan_bench.wan_suite(quick=True)
    assert _this_process() == before
    transfers = ["his", "pacs"]
    if pg_missing:
        assert res["scenarios"]["pg"] == {"skipped": pg_missing}
    else:
        transfers.append("pg")
        assert res["scenarios"]["pg"]["tps"] > 0 and res["scenarios"]["pg"]["records"] > 0
    for name in transfers:
        sc = res["scenarios"][name]
        assert sc["ship"]["replica_equal"] and sc["ship"]["wire_bytes"] > 0
        assert sc["rsync"]["wire_bytes"] > 0 and sc["zstd"]["over_link"]["payload_bytes"] == sc["zstd"]["bytes"]
        assert all(ok is not None for _t, ok, _f in _wan_bench.targets(sc))
    lag = res["scenarios"]["lag"]
    assert lag["replica_equal"] and lag["samples"] > 0 and lag["ship_returncode"] in (0, 130, -signal.SIGINT)
    md = "\n".join(_wan_bench.render(res))
    assert md.count("PASS") + md.count("FAIL") >= len(transfers) * 5 + 4
    assert ("### (d) PostgreSQL pgbench" in md) and (("Not run: " in md) == bool(pg_missing))


@pytest.mark.parametrize("env, msg", [
    ({"CDP_WAN_SCENARIOS": "his,pgbench"}, "CDP_WAN_SCENARIOS: unknown scenario pgbench; choose from his, pacs"),
    ({"CDP_WAN_SCENARIOS": " , "}, "CDP_WAN_SCENARIOS: unknown scenario (none given)"),
    ({"CDP_WAN_SCENARIOS": "pg", "CDP_WAN_PG_SCALE": "0"}, "CDP_WAN_PG_SCALE and CDP_WAN_PG_SECONDS must be"),
    ({"CDP_WAN_SCENARIOS": "pg", "CDP_WAN_PG_SECONDS": "-3"}, "must be at least 1, got 10 and -3"),
    ({"CDP_WAN_SCENARIOS": "pg", "CDP_WAN_PG_SHARED_BUFFERS": "128 MB"},
     "CDP_WAN_PG_SHARED_BUFFERS: expected a size such as 128MB (kB, MB or GB), got '128 MB'"),
])
def test_suite_bad_knobs_are_one_line(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], msg: str) -> None:
    """A bad scenario name or pgbench knob fails before any link or
    scratch directory exists, with one line that says which."""
    import _wan_bench

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _this_process()
    with pytest.raises(ValueError) as e:
        _wan_bench.wan_suite()
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert _this_process() == before
