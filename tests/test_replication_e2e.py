"""Replication end to end, in process: `Server` and `Shipper` over real TLS
(certificates from cdpcore.pki) on real loopback sockets, or over the WAN
emulator; the replica compared with the source byte for byte and by
restores at random points; cuts at random byte offsets; the source/vault
binding rules; refused certificates; --follow with a writer appending."""
from __future__ import annotations

import filecmp
import os
import random
import tempfile
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import cdpcore
from cdpcore import Journal, pki
from cdpcore.errors import AuthError, CdpError, LinkError, VaultError
from cdpcore.replication import replication_status, vault_status
from cdpcore.testing import Link, LinkProxy, memory_link_pair
from cdpcore.transport import tls
from cdpcore.transport.rate import Backoff
from cdpcore.transport.server import Server, ServerConfig
from cdpcore.transport.shipper import Shipper
from cdpcore.vault import Vault
from conftest import scale, scratch
from hypothesis import given, settings
from hypothesis import strategies as st

SEGMENT = 32 * 1024


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init(d, ["A", "B", "rev"])
    return d


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA with its own "A": must be refused everywhere."""
    d = tmp_path_factory.mktemp("pki2")
    pki.init(d, ["A"])
    return d


def make_journal(path: Path, records: int, seed: int = 1) -> Path:
    """A journal over several small segments: writes of many sizes (some
    repeated, so that dedupe has something to find), creates, renames,
    truncates and flushes."""
    root = path.parent / (path.name + "-root")
    root.mkdir()
    rng = random.Random(seed)
    page = bytes(rng.randrange(256) for _ in range(4096))
    with Journal.create(path, root, segment_size=SEGMENT, base=False) as j:
        extend(j, records, rng, page)
    return path


def extend(j: Journal, records: int, rng: random.Random, page: bytes = b"p" * 4096) -> None:
    for i in range(records):
        name = f"f{rng.randrange(5)}"
        r = rng.random()
        if r < 0.6:
            data = page if rng.random() < 0.3 else rng.randbytes(rng.choice([10, 700, 4096, 9000]))
            j.append_write(name, rng.randrange(1 << 16), data)
        elif r < 0.7:
            j.append_truncate(name, rng.randrange(1 << 16))
        elif r < 0.8:
            j.append_flush()
        elif r < 0.9:
            j.append_create(f"d{i}")
        else:
            j.append_rename(name, f"g{i}")


def server_cfg(certs: Path, **kw: object) -> ServerConfig:
    return ServerConfig(tls.server_context(certs / "server.pem", certs / "server.key", certs / "ca.pem"), **kw)  # type: ignore[arg-type]


def client_ctx(certs: Path, name: str = "A", ca: Path | None = None):  # type: ignore[no-untyped-def]
    return tls.client_context(certs / f"{name}.pem", certs / f"{name}.key", ca or certs / "ca.pem")


def fast_backoff() -> Backoff:
    return Backoff(initial=0.001, cap=0.01, rng=random.Random(0))


def assert_replica_equals(src: Path, vault: Path, name: str = "A", points: int = 4) -> None:
    """Every source segment byte-equal in the replica, and restores at random
    points (and the latest) of both byte-for-byte equal."""
    rep = vault / name / "journal"
    segs = sorted(p.name for p in (src / "segments").glob("*.seg"))
    assert segs == sorted(p.name for p in (rep / "segments").glob("*.seg"))
    for s in segs:
        assert filecmp.cmp(src / "segments" / s, rep / "segments" / s, shallow=False), s
    with Journal.open(src, readonly=True) as j:
        last = j.last_seq
    rng = random.Random(last)
    for k, at in enumerate(["latest"] + [f"seq:{rng.randrange(1, last + 1)}" for _ in range(points)]):
        scratch = Path(tempfile.mkdtemp(dir=src.parent))
        out_src, out_rep = scratch / "src", scratch / "replica"
        cdpcore.restore(str(src), out_src, at=at, audit=False)
        cdpcore.restore(str(vault / name), out_rep, at=at, audit=False)
        assert _tree(out_src) == _tree(out_rep), at


def _tree(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


async def run_ship(journal: Path, port: int, ctx, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("backoff", fast_backoff())
    return await Shipper(journal, "127.0.0.1", port, ctx, **kw).run()  # type: ignore[arg-type]


# ---- the straight path --------------------------------------------------------------


@pytest.mark.trio
async def test_ship_then_replica_equals_source_and_restores_equal(fast_tmp: Path, certs: Path) -> None:
    src = make_journal(fast_tmp / "j", scale(400, 3000))
    vault = Vault(fast_tmp / "vault", create=True)
    server = Server(vault, server_cfg(certs))
    async with trio.open_nursery() as n:
        port = await n.start(server.serve, "127.0.0.1", 0)
        result = await run_ship(src, port, client_ctx(certs))
        with Journal.open(src, readonly=True) as j:
            assert result.acked_seq == j.last_seq and result.state == "caught-up"
        assert result.wire_bytes < result.raw_bytes  # compressed and deduped
        # a second run finds nothing to do and says so quickly
        again = await run_ship(src, port, client_ctx(certs))
        assert again.raw_bytes <= 1024 and again.acked_seq == result.acked_seq
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(src, fast_tmp / "vault")
    st = replication_status(src)
    assert st["lag_bytes"] == 0 and st["lag_seconds"] == 0 and st["state"] == "caught-up"
    vs = vault_status(fast_tmp / "vault")
    assert [s["source"] for s in vs["sources"]] == ["A"] and vs["sources"][0]["last_seq"] == result.acked_seq


@pytest.mark.trio
async def test_appending_after_a_ship_ships_only_the_rest(fast_tmp: Path, certs: Path) -> None:
    src = make_journal(fast_tmp / "j", 300)
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        first = await run_ship(src, port, client_ctx(certs))
        with Journal.open(src) as j:
            extend(j, 200, random.Random(5))
        second = await run_ship(src, port, client_ctx(certs))
        assert second.acked_seq > first.acked_seq
        assert second.raw_bytes < first.raw_bytes  # only the new part (and journal.json)
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(src, fast_tmp / "vault")


@pytest.mark.trio
async def test_copies_of_chunks_in_frames_still_in_flight_are_references(fast_tmp: Path, certs: Path) -> None:
    """A database's rollback journal copies pages that the sender shipped a
    moment ago, in frames the vault may not have applied yet. Packing runs
    ahead of sending, so the sender must count the chunks of every frame it
    has packed as the vault's (the vault applies frames in order): the
    copies go as references, not bytes. A sender that learned them only
    once their frame was sent shipped each page twice here."""
    root = fast_tmp / "root"
    root.mkdir()
    rng = random.Random(7)
    pages = [rng.randbytes(4096) for _ in range(1500)]
    src = fast_tmp / "j"
    with Journal.create(src, root, base=False) as j:
        for i, page in enumerate(pages):  # the database's page writes: new content
            j.append_write("his.db", i * 4096, page)
        for i, page in enumerate(pages):  # then its rollback journal copies them
            j.append_write("his.db-journal", 8 + i * 4104, page)
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        result = await run_ship(src, port, client_ctx(certs))
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(src, fast_tmp / "vault", points=1)
    st = replication_status(src)
    assert st["dedupe_hits"] >= len(pages) - 10, st
    # random pages do not compress: once, not twice
    assert result.wire_bytes < 1.3 * len(pages) * 4096, result.wire_bytes


def _pg_like_pages(rng: random.Random, n: int) -> list[bytes]:
    """Pages of a database that overwrites them in place (PostgreSQL): a
    run of rows, so that a later version differs in a few bytes."""
    return [b"".join(b"row %06d:" % (i * 64 + r) + rng.randbytes(53) for r in range(64)) for i in range(n)]


def _rewrite(pages: list[bytes], k: int) -> list[bytes]:
    return [p[:100 * k] + b"<upd %03d>" % k + p[100 * k + 9:] for p in pages]


async def _ship_pg_like(tmp: Path, certs: Path, damage_base: bool = False) -> dict[str, Any]:
    """A database file in the base; then every page rewritten twice, far
    apart (other files' writes in between, beyond zstd's reach), in a
    second ship: each rewrite compresses against the previous version the
    vault holds (replication.md, "Base chunks"), the first against the
    base's pages. damage_base: the source's base file is changed after the
    first ship (and the new versions follow the changed bytes)."""
    rng = random.Random(11)
    root = tmp / "root"
    (root / "data").mkdir(parents=True)
    pages = _pg_like_pages(rng, 48)
    (root / "data" / "db").write_bytes(b"".join(pages))
    src = tmp / "j"
    Journal.create(src, root, segment_size=1 << 20).close()  # with a base
    vault = Vault(tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        await run_ship(src, port, client_ctx(certs))
        if damage_base:
            (base,) = (src / "base").iterdir()
            f = base / "data" / "db"
            data = bytearray(f.read_bytes())
            for i in range(8):  # one byte of each of 8 pages, which the new versions keep
                data[i * 4096 + 3000] ^= 1
            f.write_bytes(bytes(data))
            pages = [bytes(data[i * 4096:(i + 1) * 4096]) for i in range(len(pages))]
        with Journal.open(src) as j:
            for k in (1, 2):
                pages = _rewrite(pages, k)
                for i, page in enumerate(pages):
                    j.append_write("data/db", i * 4096, page)
                for i in range(60):  # other files: 2.5 MB of new bytes, more than a body's history
                    j.append_write(f"other{k}", i * 40960, rng.randbytes(40960))
        second = Shipper(src, "127.0.0.1", port, client_ctx(certs), backoff=fast_backoff())
        try:
            await second.run()
        except CdpError as e:
            if not damage_base:
                raise
            second.stats["error"] = e
        n.cancel_scope.cancel()
    vault.close()
    if not damage_base:
        assert_replica_equals(src, tmp / "vault", points=2)
    return second.stats


@pytest.mark.trio
async def test_rewritten_pages_compress_against_their_previous_version(fast_tmp: Path, certs: Path) -> None:
    stats = await _ship_pg_like(fast_tmp, certs)
    # each of the 48 pages, twice: first against the base's page, then against the first rewrite
    assert stats["base_hits"] == 96, stats
    assert stats["base_bytes"] == 96 * 4096
    # 4.9 MB of random other bytes cannot shrink; the 384 KiB of pages all but vanish
    assert stats["wire_bytes"] < 120 * 40960 + 60_000, stats


@pytest.mark.trio
async def test_a_source_base_changed_after_shipping_is_refused_not_replicated(fast_tmp: Path, certs: Path) -> None:
    """The sender names a page's previous version by its place in the base;
    if the source's base file changed after it was shipped (damage: bases
    are never rewritten), the vault's copy differs, zstd's checksum
    refuses the frame, and the sender stops with that error: nothing
    wrong reaches the replica, and what it holds still restores."""
    stats = await _ship_pg_like(fast_tmp, certs, damage_base=True)
    assert isinstance(stats.get("error"), CdpError) and "checksum" in str(stats["error"]), stats
    rep = fast_tmp / "vault" / "A"
    with Journal.open(fast_tmp / "j", readonly=True) as j:
        last = j.last_seq
    with Journal.open(rep / "journal", readonly=True) as r:
        assert r.last_seq < last
    cdpcore.restore(str(rep), fast_tmp / "out", audit=False)
    assert (fast_tmp / "out" / "data" / "db").stat().st_size == 48 * 4096


# ---- cuts -------------------------------------------------------------------------------


async def _ship_through_cuts(tmp: Path, certs: Path, offsets: list[int]) -> tuple[int, int]:
    """Ship through a proxy that cuts connection i after offsets[i] bytes
    (in the direction given by the sign: >0 client->server, <0 back)."""
    src = make_journal(tmp / "j", 250, seed=len(offsets))
    vault = Vault(tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        cut = iter(offsets)

        class Cutting(LinkProxy):
            """Each new connection gets the next drop point."""

            async def _handle(self, client: trio.SocketStream) -> None:  # type: ignore[override]
                off = next(cut, None)
                self.up = Link(drop_after=off if off and off > 0 else None)
                self.down = Link(drop_after=-off if off and off < 0 else None)
                await super()._handle(client)

        proxy = Cutting("127.0.0.1", port, Link())
        pport = await n.start(proxy.run)
        result = await run_ship(src, pport, client_ctx(certs), give_up=60)
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(src, tmp / "vault", points=1)
    return result.connections, len(proxy.connections)


@pytest.mark.trio
async def test_cut_at_random_byte_offsets_then_resume_loses_nothing(fast_tmp: Path, certs: Path) -> None:
    rng = random.Random(42)
    n = scale(12, 100)
    # both directions, early (inside TLS and the handshake) and late
    offsets = [rng.choice([1, -1]) * rng.randrange(1, 60_000) for _ in range(n)]
    offsets[:4] = [5, -5, 700, -2000]
    connections, proxied = await _ship_through_cuts(fast_tmp, certs, offsets)
    # the small cuts always hit (a cut past what is left to send does not)
    assert proxied >= 5 and connections <= proxied


@pytest.mark.trio
async def test_emulated_wan_10mbit_50ms_under_mock_clock(fast_tmp: Path, certs: Path,
                                                        autojump_clock: trio.testing.MockClock) -> None:
    """10 Mbit/s, 50 ms each way, with drops: virtual time, so it runs in
    milliseconds; the time taken is what the link allows."""
    src = make_journal(fast_tmp / "j", 400)
    vault = Vault(fast_tmp / "vault", create=True)
    server = Server(vault, server_cfg(certs, inline_io=True, log=open(os.devnull, "w")))
    drops = iter([30_000, 80_000, None])

    async def open_stream() -> trio.abc.Stream:
        d = next(drops, None)
        client, far = memory_link_pair(Link(bandwidth=10e6, latency=0.05, drop_after=d),
                                       Link(bandwidth=10e6, latency=0.05))
        nursery.start_soon(server.handle, far)
        return client

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        sh = Shipper(src, "localhost", 1, client_ctx(certs), open_stream=open_stream, backoff=fast_backoff(),
                     inline_io=True)
        result = await sh.run()
        elapsed = trio.current_time() - start
    vault.close()
    assert result.connections == 3
    # at least the bytes on the wire at 10 Mbit/s, plus round trips
    assert elapsed >= result.wire_bytes * 8 / 10e6
    assert_replica_equals(src, fast_tmp / "vault", points=1)


# ---- binding and authorisation --------------------------------------------------------


@pytest.mark.trio
async def test_source_is_the_certificate_and_bound_to_its_journal(fast_tmp: Path, certs: Path) -> None:
    a = make_journal(fast_tmp / "a", 100, seed=1)
    b = make_journal(fast_tmp / "b", 100, seed=2)
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        # B's journal shipped with B's certificate lands in VAULT/B
        await run_ship(b, port, client_ctx(certs, "B"))
        b_before = _tree(fast_tmp / "vault" / "B")
        # A's certificate with B's journal: written only under VAULT/A
        await run_ship(b, port, client_ctx(certs, "A"))
        assert _tree(fast_tmp / "vault" / "B").keys() == b_before.keys()
        # ... and now A is bound to B's uuid: A's own journal is refused
        with pytest.raises(VaultError, match="bound to journal"):
            await run_ship(a, port, client_ctx(certs, "A"))
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(b, fast_tmp / "vault", "A", points=0)
    assert_replica_equals(b, fast_tmp / "vault", "B", points=0)
    meta = (fast_tmp / "vault" / "A" / "source.json").read_text()
    with Journal.open(b, readonly=True) as j:
        assert str(uuidlib.UUID(j.uuid)) in meta


@pytest.mark.trio
async def test_unknown_and_revoked_certificates_are_refused(fast_tmp: Path, certs: Path, stranger: Path) -> None:
    src = make_journal(fast_tmp / "j", 30)
    vault = Vault(fast_tmp / "vault", create=True)
    revoked = frozenset({pki.serial_of(certs / "rev.pem")})
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs, revoked=revoked, log=open(os.devnull, "w"))).serve,
                             "127.0.0.1", 0)
        with pytest.raises(AuthError, match="refused by the server"):  # client cert from another CA
            await run_ship(src, port, client_ctx(stranger, "A", ca=certs / "ca.pem"))
        with pytest.raises(AuthError, match="not trusted"):  # the server is not signed by our --ca
            await run_ship(src, port, client_ctx(certs, "A", ca=stranger / "ca.pem"))
        with pytest.raises(AuthError, match="revoked"):
            await run_ship(src, port, client_ctx(certs, "rev"))
        n.cancel_scope.cancel()
    vault.close()
    assert not (fast_tmp / "vault" / "A").exists() and not (fast_tmp / "vault" / "rev").exists()


@pytest.mark.trio
async def test_unreachable_receiver_gives_up_with_link_error(fast_tmp: Path, certs: Path) -> None:
    src = make_journal(fast_tmp / "j", 10)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    with pytest.raises(LinkError, match="no progress"):
        await run_ship(src, port, client_ctx(certs), give_up=0.05)
    assert replication_status(src)["state"] == "failed"


# ---- follow ------------------------------------------------------------------------------


@pytest.mark.trio
async def test_follow_ships_what_a_writer_appends_meanwhile(fast_tmp: Path, certs: Path) -> None:
    src = make_journal(fast_tmp / "j", 50)
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        sh = Shipper(src, "127.0.0.1", port, client_ctx(certs), follow=True, backoff=fast_backoff())
        result: list[object] = []

        async def ship() -> None:
            result.append(await sh.run())

        n.start_soon(ship)
        rng = random.Random(3)
        with Journal.open(src) as j:
            for _ in range(scale(5, 20)):
                extend(j, 40, rng)
                await trio.sleep(0.02)
            last = j.last_seq
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            while sh.stats["acked_seq"] < last:
                await trio.sleep(0.01)
        sh.stop()
        with trio.fail_after(30):
            while not result:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    vault.close()
    assert result[0].state == "stopped"  # type: ignore[attr-defined]
    assert_replica_equals(src, fast_tmp / "vault", points=2)


# ---- end-to-end encryption -----------------------------------------------------------


@pytest.mark.trio
async def test_encrypted_shipping_leaves_no_plaintext_and_restores_with_the_key(fast_tmp: Path, certs: Path) -> None:
    from cdpcore.crypto import write_key_file
    from cdpcore.errors import KeyFileError
    from cdpcore.vault.sealed import materialize

    marker = b"PATIENT-RECORD-" * 40  # must never appear in the vault
    root = fast_tmp / "root"
    root.mkdir()
    src = fast_tmp / "j"
    with Journal.create(src, root, segment_size=SEGMENT, base=False) as j:
        extend(j, 150, random.Random(9))
        for i in range(20):
            j.append_write("secret", i * len(marker), marker)
    keys = write_key_file(fast_tmp / "e2e.key")
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        result = await run_ship(src, port, client_ctx(certs), keys=keys)
        with Journal.open(src, readonly=True) as j:
            assert result.acked_seq == j.last_seq
        n.cancel_scope.cancel()
    vault.close()
    for p in (fast_tmp / "vault").rglob("*"):
        if p.is_file():
            assert marker[:32] not in p.read_bytes(), p
    assert not (fast_tmp / "vault" / "A" / "journal" / "segments").exists() or \
        not list((fast_tmp / "vault" / "A" / "journal" / "segments").glob("*.seg"))
    out = materialize(fast_tmp / "vault" / "A", keys, fast_tmp / "plain")
    for s in (src / "segments").glob("*.seg"):
        assert (Path(out) / "segments" / s.name).read_bytes() == s.read_bytes()
    wrong = write_key_file(fast_tmp / "other.key")
    with pytest.raises(KeyFileError):
        materialize(fast_tmp / "vault" / "A", wrong, fast_tmp / "wrong")
    # through cdpctl: restore at the DR site needs the key, and then equals the source's
    from cdpcore.cli.main import main
    assert main(["restore", str(fast_tmp / "vault" / "A"), str(fast_tmp / "r0")]) == 24
    assert main(["restore", str(fast_tmp / "vault" / "A"), str(fast_tmp / "r1"),
                 "--encrypt-key", str(fast_tmp / "e2e.key")]) == 0
    cdpcore.restore(str(src), fast_tmp / "r2", audit=False)
    assert _tree(fast_tmp / "r1") == _tree(fast_tmp / "r2")


# ---- dedupe domains ------------------------------------------------------------------


@pytest.mark.trio
async def test_dedupe_domain_shares_chunks_between_its_sources_only(fast_tmp: Path, certs: Path) -> None:
    """Two sources writing the same pages: inside a domain the second one
    sends references; a source outside it (or not listed) cannot join."""
    shared = random.Random(11).randbytes(64 * 1024)

    def journal(name: str) -> Path:
        root = fast_tmp / f"{name}-root"
        root.mkdir()
        with Journal.create(fast_tmp / name, root, segment_size=SEGMENT, base=False) as j:
            for i in range(8):
                j.append_write("pacs.dcm", i * 8192, shared[i * 8192:(i + 1) * 8192])
        return fast_tmp / name

    a, b = journal("a"), journal("b")
    vault = Vault(fast_tmp / "vault", create=True, domains={"ward": ["A", "B"]})
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        first = Shipper(a, "127.0.0.1", port, client_ctx(certs, "A"), domain="ward", backoff=fast_backoff())
        await first.run()
        second = Shipper(b, "127.0.0.1", port, client_ctx(certs, "B"), domain="ward", backoff=fast_backoff())
        await second.run()
        assert second.stats["dedupe_bytes"] >= 7 * 8192  # B's pages were already in the domain
        assert second.stats["wire_bytes"] < first.stats["wire_bytes"] / 2
        with pytest.raises(VaultError, match="not in dedupe domain"):
            await run_ship(make_journal(fast_tmp / "r", 5), port, client_ctx(certs, "rev"), domain="ward")
        n.cancel_scope.cancel()
    vault.close()
    assert_replica_equals(a, fast_tmp / "vault", "A", points=1)
    assert_replica_equals(b, fast_tmp / "vault", "B", points=1)


# ---- property: any schedule of cuts, under the MockClock -------------------------------


@pytest.fixture(scope="module")
def cut_journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_journal(tmp_path_factory.mktemp("cuts") / "j", 120, seed=5)


@settings(max_examples=scale(8, 60))
@given(cuts=st.lists(st.tuples(st.sampled_from(["up", "down"]), st.integers(1, 40_000)), max_size=6))
def test_any_schedule_of_cuts_ends_with_the_replica_equal(cuts: list[tuple[str, int]], cut_journal: Path,
                                                          certs: Path) -> None:
    """Model: whatever the cuts (direction, byte offset, one per connection),
    the replica ends byte-equal to the source and the run succeeds, over a
    10 Mbit/s 20 ms link in virtual time."""
    with scratch() as d:
        vault = Vault(Path(d) / "vault", create=True)
        server = Server(vault, server_cfg(certs, inline_io=True, log=open(os.devnull, "w")))
        schedule = iter(cuts)

        async def main() -> int:
            async with trio.open_nursery() as nursery:
                async def open_stream() -> trio.abc.Stream:
                    way, off = next(schedule, (None, None))
                    up = Link(bandwidth=10e6, latency=0.02, drop_after=off if way == "up" else None)
                    down = Link(bandwidth=10e6, latency=0.02, drop_after=off if way == "down" else None)
                    client, far = memory_link_pair(up, down)
                    nursery.start_soon(server.handle, far)
                    return client

                sh = Shipper(cut_journal, "localhost", 1, client_ctx(certs), open_stream=open_stream,
                             backoff=fast_backoff(), inline_io=True, state_file=False)
                result = await sh.run()
                nursery.cancel_scope.cancel()
            return result.connections

        connections = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        vault.close()
        assert 1 <= connections <= len(cuts) + 1
        assert_replica_equals(cut_journal, Path(d) / "vault", points=0)


@pytest.mark.trio
async def test_damage_in_the_source_journal_stops_the_sender_with_its_error(fast_tmp: Path, certs: Path) -> None:
    from cdpcore.errors import CorruptJournal

    src = make_journal(fast_tmp / "j", 200)
    seg = sorted((src / "segments").glob("*.seg"))[0]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a record in a sealed segment: never shipped, reported
    seg.write_bytes(bytes(data))
    vault = Vault(fast_tmp / "vault", create=True)
    async with trio.open_nursery() as n:
        port = await n.start(Server(vault, server_cfg(certs)).serve, "127.0.0.1", 0)
        with pytest.raises(CorruptJournal):
            await run_ship(src, port, client_ctx(certs))
        n.cancel_scope.cancel()
    vault.close()
    import json
    assert json.loads((src / "replication.json").read_text())["state"] == "failed"
    rep = fast_tmp / "vault" / "A" / "journal" / "segments" / seg.name
    assert not rep.exists() or rep.read_bytes() == bytes(data[:rep.stat().st_size])
