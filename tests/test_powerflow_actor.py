"""The shared power-flow actor and its client (``evgrid.cluster.powerflow``).

Ray runs on loopback, started once for the module; the actors of every test are started together at the
beginning so their feeders build in parallel while the in-process tests run.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time

import numpy as np
import pytest

os.environ["OMP_NUM_THREADS"] = "1"

import ray  # noqa: E402
import ray.exceptions  # noqa: E402

from evgrid.cluster import powerflow as pf  # noqa: E402
from evgrid.envs.config import load_config  # noqa: E402
from evgrid.envs.sim import GridSolution, LocalGrid, Sim  # noqa: E402

NS = "evgrid-test-powerflow"
CFG33 = load_config(None, {})
CITY = load_config(None, {"grid": {"feeder": "city", "city_networks": 2}})
# exact: one request per solve is LocalGrid's computation; micro-batched: the solver tolerance (module docstring)
EXACT = 1e-9
BATCHED_PU = 1e-7


def _inputs(feeder, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Loads around nominal plus EV charging heavy enough that enforcement curtails in most scenarios."""
    p = feeder.base_p_kw * rng.uniform(0.3, 1.3, (batch, feeder.n_bus))
    q = feeder.base_q_kvar * rng.uniform(0.3, 1.3, (batch, feeder.n_bus))
    flex_c = rng.uniform(0.0, 250.0, (batch, feeder.n_bus)) * (rng.random((batch, feeder.n_bus)) < 0.4)
    flex_v = rng.uniform(0.0, 40.0, (batch, feeder.n_bus))
    return p + flex_c, q, flex_c, flex_v


def _assert_same(a: GridSolution, b: GridSolution, atol: float, atol_kw: float | None = None) -> None:
    atol_kw = atol if atol_kw is None else atol_kw
    for name in ("vm_pu", "line_loading", "trafo_loading"):
        np.testing.assert_allclose(getattr(a.flow, name), getattr(b.flow, name), rtol=0, atol=atol, err_msg=name)
    # an angle error of x p.u. (rad) is 57 x degrees
    np.testing.assert_allclose(a.flow.va_deg, b.flow.va_deg, rtol=0, atol=atol * 60, err_msg="va_deg")
    for name in ("loss_kw", "slack_p_kw", "slack_q_kvar"):
        np.testing.assert_allclose(getattr(a.flow, name), getattr(b.flow, name), rtol=0, atol=atol_kw, err_msg=name)
    np.testing.assert_array_equal(a.flow.converged, b.flow.converged)
    np.testing.assert_allclose(a.vm_dispatch_pu, b.vm_dispatch_pu, rtol=0, atol=atol)
    np.testing.assert_allclose(a.curtail_kw, b.curtail_kw, rtol=0, atol=atol_kw)
    np.testing.assert_allclose(a.v2g_kw, b.v2g_kw, rtol=0, atol=atol_kw)


@pytest.fixture(scope="module")
def feeders33():
    return pf.build_feeders(CFG33.grid).feeders


@pytest.fixture(scope="module")
def feeders_city():
    return pf.build_feeders(CITY.grid).feeders


@pytest.fixture(scope="module")
def ray_session():
    from evgrid.cluster.runtime import loopback_only

    loopback_only()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    # start every test's actors now: they build their feeders concurrently
    # (each actor process costs ~5 s of imports and feeder building on 2 cores: t33 also serves the fault test,
    # the module's last, which kills it for good)
    handles = {
        "t33": pf.get_or_create_actor(CFG33, name="t33", namespace=NS, max_restarts=1, wait=False),
        "tcity": pf.get_or_create_actor(CITY, name="tcity", namespace=NS, num_actors=2, wait=False),
    }
    yield handles
    ray.shutdown()


@pytest.fixture(scope="module")
def actors(ray_session):
    ray.get([h.info.remote() for hs in ray_session.values() for h in hs], timeout=120)
    return ray_session


# ------------------------------------------------------------------------------------------ without Ray actors


def test_build_feeders_as_sim():
    for cfg in (load_config(None, {"grid": {"n_zones": 4}}), CITY):
        sim = Sim(cfg, 1)
        fs = pf.build_feeders(cfg.grid)
        assert [f.name for f in fs.feeders] == [f.name for f in sim.feeders]
        assert fs.load_kinds == sim.load_kinds
        for i, (a, b) in enumerate(zip(fs.feeders, sim.feeders)):
            np.testing.assert_array_equal(a.base_p_kw, b.base_p_kw)
            zones = sim.zone_of_bus[sim.bus_offset[i]:sim.bus_offset[i + 1]]
            np.testing.assert_array_equal(fs.zone_of_bus[i], zones - zones.min())
        assert pf.n_feeders(cfg.grid) == len(sim.feeders)


def test_service_micro_batches_clients_in_process(feeders33):
    """Concurrent requests of 4 clients become one solve per step; each client gets its solo answer, warm
    starts kept apart (one client resets mid-run: warm and cold clients share a batch)."""
    svc = pf.PowerFlowService(CFG33.grid, max_wait_ms=200.0)
    f = feeders33[0]
    batch = {"a": 3, "b": 1, "c": 8, "d": 2}
    solo = {c: LocalGrid(feeders33, CFG33) for c in batch}
    rngs = {c: np.random.default_rng(i) for i, c in enumerate(batch)}

    async def step(reset: set[str]):
        ins = {c: _inputs(f, b, rngs[c]) for c, b in batch.items()}
        out = await asyncio.gather(*(svc.solve(c, 0, *ins[c], cold=c in reset) for c in batch))
        for c, got in zip(batch, out):
            if c in reset:
                solo[c].reset()
            _assert_same(got, solo[c].solve(0, *ins[c]), BATCHED_PU, 1e-4)
            assert got.flow.state is None  # the warm start stays in the service

    async def run():
        for t in range(4):
            await step({"b"} if t == 2 else set())

    asyncio.run(run())
    s = asyncio.run(svc.stats())
    assert s["requests"] == 16 and s["solves"] == 4 and s["max_requests_per_solve"] == 4
    assert s["warm_states"] == 4


def test_service_rejects_bad_requests(feeders33):
    svc = pf.PowerFlowService(CFG33.grid, micro_batching=False)
    f = feeders33[0]
    p, q, fc, fv = _inputs(f, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="f: feeder 1 is not served"):
        asyncio.run(svc.solve("x", 1, p, q, fc, fv))
    with pytest.raises(ValueError, match="q_kvar: expected shape"):
        asyncio.run(svc.solve("x", 0, p, q[:1], fc, fv))
    with pytest.raises(ValueError, match="flex_charge_kw: expected values >= 0"):
        asyncio.run(svc.solve("x", 0, p, q, -fc - 1, fv))
    with pytest.raises(ValueError, match="max_wait_ms"):
        pf.PowerFlowService(CFG33.grid, max_wait_ms=-1)
    with pytest.raises(ValueError, match="n_shards: expected 1..1"):
        pf.PowerFlowService(CFG33.grid, 0, 2)
    with pytest.raises(ValueError, match=r"num_actors: expected 1..2"):
        pf.get_or_create_actor(CITY, num_actors=3)


class _FakeMethod:
    def remote(self, *args):
        return args


class _FakeHandle:
    solve_packed = _FakeMethod()


def _fake_client(max_retries: int) -> pf.PowerFlowClient:
    c = pf.PowerFlowClient.__new__(pf.PowerFlowClient)
    c.__dict__.update(grid=CFG33.grid, name="fake", namespace=NS, max_retries=max_retries, backoff_s=0.0,
                      max_backoff_s=0.0, timeout_s=None, retries=0, n_shards=1, n_feeders=1, _handles=[_FakeHandle()],
                      _transport="ray")
    c._new_identity()
    return c


def test_client_retries_then_gives_up(monkeypatch, feeders33):
    """The retry loop itself, deterministic: failures of a dying actor are re-sent, others are not."""
    failures = []
    answer = pickle.dumps("solved")

    def fake_get(ref, timeout=None):
        if failures:
            raise failures.pop(0)
        return answer

    monkeypatch.setattr(pf.ray, "get", fake_get)
    monkeypatch.setattr(pf.ray, "get_actor", lambda *a, **k: _FakeHandle())
    args = _inputs(feeders33[0], 1, np.random.default_rng(0))
    c = _fake_client(max_retries=3)
    failures[:] = [ray.exceptions.ActorUnavailableError("restarting", None), ray.exceptions.ActorDiedError()]
    assert c.solve(0, *args) == "solved" and c.retries == 2
    failures[:] = [ray.exceptions.ActorDiedError()] * 4
    with pytest.raises(RuntimeError, match=r"'fake-0'.*4 tries in a row"):
        c.solve(0, *args)
    failures[:] = [ValueError("p_kw: bad")]  # the actor's own error: not a fault to retry
    with pytest.raises(ValueError, match="p_kw"):
        c.solve(0, *args)
    with pytest.raises(ValueError, match=r"f: expected a feeder index in \[0, 0\]"):
        c.solve(1, *args)


def test_channel_pairs_answers_with_requests_in_any_order(tmp_path):
    """The same-node socket's framing: answers come back out of order (two feeders of one shard), each reaches
    its own receive; a closed socket is a lost channel (retried), not a hang."""
    import socket

    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        frames = []
        for _ in range(2):
            seq, n = pf._FRAME.unpack(conn.recv(pf._FRAME.size, socket.MSG_WAITALL))
            frames.append((seq, conn.recv(n, socket.MSG_WAITALL)))
        for seq, body in frames[::-1]:
            answer = body.upper() * 1000  # longer than one recv
            conn.sendall(pf._FRAME.pack(seq, len(answer)) + answer)
        conn.recv(pf._FRAME.size + 5, socket.MSG_WAITALL)  # a third request: the "actor" dies without answering
        conn.close()

    th = threading.Thread(target=serve)
    th.start()
    ch = pf._Channel(path, timeout_s=10.0)
    first, second = ch.send(b"feeder 0"), ch.send(b"feeder 1")
    assert bytes(ch.receive(first)) == b"FEEDER 0" * 1000
    assert bytes(ch.receive(second)) == b"FEEDER 1" * 1000
    third = ch.send(b"again")
    th.join(10)
    with pytest.raises(pf._ChannelLost, match="closed the channel"):
        ch.receive(third)
    srv.close()
    with pytest.raises(pf._ChannelLost):
        pf._Channel(path, timeout_s=1.0)


def test_dead_channels_are_swept(tmp_path, monkeypatch):
    """Actors killed by Ray leave their channel directory behind; a new channel removes those whose socket
    refuses connections, and keeps live ones and ones too young to judge."""
    import socket

    monkeypatch.setattr(pf.tempfile, "gettempdir", lambda: str(tmp_path))
    dirs = {k: tmp_path / f"{pf._CHANNEL_PREFIX}{k}" for k in ("dead", "live", "young", "empty")}
    servers = []
    for k, d in dirs.items():
        d.mkdir()
        if k != "empty":
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(str(d / "solve.sock"))
            srv.listen(1)
            servers.append((k, srv))
    for k, srv in servers:
        if k != "live":
            srv.close()  # the socket file stays, nobody listens: a killed actor's
    (tmp_path / "unrelated").mkdir()
    old = time.time() - 3600
    for k, d in dirs.items():
        if k != "young":
            os.utime(d, (old, old))
    assert pf._remove_dead_channels() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{pf._CHANNEL_PREFIX}live", f"{pf._CHANNEL_PREFIX}young", "unrelated"])
    for _, srv in servers:
        srv.close()


def test_make_grid_without_ray_is_local(monkeypatch, caplog, feeders33):
    assert isinstance(pf.make_grid(CFG33, "local", feeders=feeders33), LocalGrid)
    monkeypatch.setattr(pf.ray, "is_initialized", lambda: False)
    with caplog.at_level("WARNING", logger="evgrid.cluster.powerflow"):
        assert isinstance(pf.make_grid(CFG33, "actor", feeders=feeders33), LocalGrid)
    assert "Ray is not initialised" in caplog.text
    with pytest.raises(ValueError, match="mode: expected one of local, actor"):
        pf.make_grid(CFG33, "remote")


# ------------------------------------------------------------------------------------------ with Ray


def test_client_matches_local_grid(actors, feeders33):
    client = pf.PowerFlowClient(CFG33, name="t33", namespace=NS)
    local = LocalGrid(feeders33, CFG33)
    rng = np.random.default_rng(1)
    curtailed = 0.0
    # warm steps, a batch-size change (cold), a reset (cold), more warm steps
    for t, batch in enumerate((4, 4, 4, 1, 1, 6, 6)):
        if t == 5:
            client.reset()
            local.reset()
        ins = _inputs(feeders33[0], batch, rng)
        a, b = client.solve(0, *ins), local.solve(0, *ins)
        _assert_same(a, b, EXACT)
        curtailed += float(b.curtail_kw.sum())
    assert curtailed > 0  # enforcement was exercised
    with pytest.raises(ValueError, match=r"p_kw: expected shape \(batch, 33\)"):  # the actor's error, re-raised
        client.solve(0, *(x[:, :5] for x in ins))
    _assert_same(client.solve(0, *ins), local.solve(0, *ins), EXACT)  # and the actor carries on


def test_sharding_routes_feeders_to_their_actor(actors, feeders_city):
    client = pf.PowerFlowClient(CITY, name="tcity", namespace=NS)
    assert client.n_shards == 2 and [client.shard_of(f) for f in (0, 1)] == [0, 1]
    client.stats(reset=True)
    local = LocalGrid(feeders_city, CITY)
    rng = np.random.default_rng(2)
    for _ in range(3):
        ins = [_inputs(fd, 3, rng) for fd in feeders_city]
        pending = [client.submit(f, *ins[f]) for f in (0, 1)]  # both shards at once
        for f, req in enumerate(pending):
            _assert_same(req.result(), local.solve(f, *ins[f]), EXACT)
    s0, s1 = client.stats()
    assert s0["requests_per_feeder"] == {0: 3} and s1["requests_per_feeder"] == {1: 3}
    assert s0["pid"] != s1["pid"]
    with pytest.raises(ValueError, match="already serves another grid or sharding"):
        pf.get_or_create_actor(CITY, name="tcity", namespace=NS, num_actors=1)
    with pytest.raises(ValueError, match="grid differs"):
        pf.PowerFlowClient(load_config(None, {"grid": {"feeder": "city", "city_networks": 2, "v_min_pu": 0.9}}),
                           name="tcity", namespace=NS)


def test_micro_batching_concurrent_clients(actors, feeders33):
    """4 driver threads, one client each, in lock-step: fewer solves than requests, solo answers per client."""
    n_client, steps = 4, 4
    clients = [pf.PowerFlowClient(CFG33, name="t33", namespace=NS) for _ in range(n_client)]
    clients[0].configure(micro_batching=True, max_wait_ms=100.0)
    clients[0].stats(reset=True)
    rng = np.random.default_rng(3)
    ins = [[_inputs(feeders33[0], 1 + i, rng) for _ in range(steps)] for i in range(n_client)]
    got: list[list[GridSolution | None]] = [[None] * steps for _ in range(n_client)]
    barrier = threading.Barrier(n_client)

    def work(i: int) -> None:
        for t in range(steps):
            barrier.wait()
            got[i][t] = clients[i].solve(0, *ins[i][t])

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_client)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        s = clients[0].stats()[0]
    finally:
        clients[0].configure(max_wait_ms=1.0)
    for i in range(n_client):
        solo = LocalGrid(feeders33, CFG33)
        for t in range(steps):
            _assert_same(got[i][t], solo.solve(0, *ins[i][t]), BATCHED_PU, 1e-4)
    assert s["requests"] == n_client * steps
    assert s["solves"] < s["requests"] and s["max_requests_per_solve"] > 1


def test_sim_with_client_matches_local(actors):
    # an evening on a heavily loaded feeder: enforcement curtails from the first step (base_load_scale differs
    # from the actor's config: it only changes the injections, so the actor still serves it)
    over = {"start_hour": 17.0, "n_steps": 6, "grid": {"base_load_scale": 0.9},
            "fleet": {"n_ev": 600, "v2g_share": 0.0},
            "stations": {"ports": 400, "p_max_kw": 3000.0},
            "agents": {"operator": "rule", "station": "rule", "ev_view": "rule"}}
    cfg = load_config(None, over)
    grid = pf.make_grid(cfg, "actor", name="t33", namespace=NS)
    assert isinstance(grid, pf.PowerFlowClient)
    remote, local = Sim(cfg, n_env=2, grid=grid), Sim(cfg, n_env=2)
    remote.reset()
    local.reset()
    cut = 0.0
    for _ in range(cfg.n_steps):
        a, b = remote.step(), local.step()
        np.testing.assert_allclose(a["vm_pu"], b["vm_pu"], rtol=0, atol=EXACT)
        np.testing.assert_allclose(a["p_ev_kw"], b["p_ev_kw"], rtol=0, atol=EXACT)
        cut += float(b["curtail_kw"].sum())
    assert cut > 0


def test_make_grid_falls_back_to_local(actors, caplog):
    with caplog.at_level("WARNING", logger="evgrid.cluster.powerflow"):
        grid = pf.make_grid(CFG33, "actor", name="absent", namespace=NS)
    assert isinstance(grid, LocalGrid)
    assert "no power-flow actor 'absent-0'" in caplog.text


def test_client_copy_is_another_client(actors):
    c = pf.PowerFlowClient(CFG33, name="t33", namespace=NS)
    d = pickle.loads(pickle.dumps(c))
    assert d.client_id != c.client_id and d.n_shards == c.n_shards


def _kill(handle, pid: int, no_restart: bool) -> None:
    """Kill the actor and wait until its process is gone, so the next call meets a dead or restarting actor
    (a request on the same-node socket could otherwise still be answered by the dying process)."""
    ray.kill(handle, no_restart=no_restart)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"actor process {pid} still alive 30 s after ray.kill")


def test_actor_restart_then_dead(actors, feeders33):
    """Last in the module: it kills t33.  Killed with a restart left: each client (same-node socket, Ray
    calls) re-sends and gets a (cold-started) correct answer.  Killed for good: each gives up after
    1 + max_retries tries with an error that names the actor."""
    clients = [pf.PowerFlowClient(CFG33, name="t33", namespace=NS, backoff_s=0.2, transport=t)
               for t in ("auto", "ray")]
    local = LocalGrid(feeders33, CFG33)
    rng = np.random.default_rng(4)
    ins = _inputs(feeders33[0], 2, rng)
    for c in clients:
        _assert_same(c.solve(0, *ins), local.solve(0, *ins), EXACT)
        local.reset()
    assert isinstance(clients[0]._channels[0], pf._Channel) and clients[1]._channels[0] is False
    handle = actors["t33"][0]
    pid0 = clients[0].stats()[0]["pid"]
    _kill(handle, pid0, no_restart=False)
    ins = _inputs(feeders33[0], 2, rng)
    # Ray calls first: they meet the restarting actor (the socket client's channel stays broken anyway)
    for c in clients[::-1]:
        got = c.solve(0, *ins)
        local.reset()  # the restarted actor lost its warm start: compare with a cold solve
        _assert_same(got, local.solve(0, *ins), EXACT)
        assert c.retries >= 1
    pid1 = clients[0].stats()[0]["pid"]
    assert pid1 != pid0
    _kill(handle, pid1, no_restart=True)
    for c in clients:
        c.max_retries, c.backoff_s, c.max_backoff_s = 2, 0.05, 0.05
        with pytest.raises(RuntimeError, match=r"'t33-0' \(namespace 'evgrid-test-powerflow'\).*3 tries in a row"):
            c.solve(0, *ins)
