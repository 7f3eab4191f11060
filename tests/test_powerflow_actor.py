"""The shared power-flow service (``evgrid.cluster.powerflow``): the batching service in-process, the
same-node channel, the client's retries, and the Ray actors with their clients over both transports.

Ray runs on loopback, started once for the module (``evgrid.cluster.runtime.connect``); the actors of every
test are started together by the first test so their feeders build while the in-process tests run.
"""

from __future__ import annotations

import ast
import asyncio
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["OMP_NUM_THREADS"] = "1"

import ray  # noqa: E402
import ray.exceptions  # noqa: E402

from evgrid.cluster import powerflow as pf  # noqa: E402
from evgrid.cluster.powerflow import client as client_mod  # noqa: E402
from evgrid.cluster.powerflow import transport  # noqa: E402
from evgrid.envs.config import load_config  # noqa: E402
from evgrid.envs.sim import Sim  # noqa: E402
from evgrid.grid import service as grid_service  # noqa: E402
from evgrid.grid.service import GridSolution, LocalGrid  # noqa: E402
from tests.grid_service_conformance import GridServiceConformance, case, requests  # noqa: E402

NS = "evgrid-test-powerflow"
CFG33 = load_config(None, {})
CITY = load_config(None, {"grid": {"feeder": "city", "city_networks": 2}})
# the conformance cases' actors: t33 also serves the fault test, the module's last, which kills it for good
ACTOR_OF = {"ieee33": "t33", "ieee33_pv": "tpv", "city2": "tcity"}
# several requests in one solve agree with each solved alone to the solver tolerance (service docstring): in
# kW, relative to flows of a few MW
BATCHED_PU = 1e-7
BATCHED_KW = 1e-3


def _assert_close(a: GridSolution, b: GridSolution, atol_pu: float, atol_kw: float) -> None:
    for name in ("vm_pu", "line_loading", "trafo_loading"):
        np.testing.assert_allclose(getattr(a.flow, name), getattr(b.flow, name), rtol=0, atol=atol_pu, err_msg=name)
    # an angle error of x p.u. (rad) is 57 x degrees
    np.testing.assert_allclose(a.flow.va_deg, b.flow.va_deg, rtol=0, atol=atol_pu * 60, err_msg="va_deg")
    for name in ("loss_kw", "slack_p_kw", "slack_q_kvar"):
        np.testing.assert_allclose(getattr(a.flow, name), getattr(b.flow, name), rtol=0, atol=atol_kw, err_msg=name)
    np.testing.assert_array_equal(a.flow.converged, b.flow.converged)
    np.testing.assert_allclose(a.vm_dispatch_pu, b.vm_dispatch_pu, rtol=0, atol=atol_pu)
    for name in ("curtail_kw", "v2g_kw", "gen_curtail_kw"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=atol_kw, err_msg=name)


@pytest.fixture(scope="module")
def ray_session():
    from evgrid.cluster.runtime import connect

    with connect(num_cpus=2):
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        # each actor process costs ~5 s of imports and feeder building on 2 cores: all start now, together
        handles = {name: pf.get_or_create_actor(case(c).grid, name=name, namespace=NS, wait=False,
                                                num_actors=len(case(c).feeders), max_restarts=1)
                   for c, name in ACTOR_OF.items()}
        yield handles


@pytest.fixture(scope="module")
def actors(ray_session):
    ray.get([h.info.remote() for hs in ray_session.values() for h in hs], timeout=180)
    return ray_session


# ------------------------------------------------------------------------------------------ without Ray actors


def test_package_layout(ray_session):
    """The batching service and the transport import no Ray (the service learns its node as an argument);
    the package re-exports the shared grid pieces."""
    root = Path(pf.__file__).parent
    for module in ("service.py", "transport.py"):
        tree = ast.parse((root / module).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m == "ray" or m.startswith("ray.")}, module
    assert pf.build_feeders is grid_service.build_feeders and pf.n_feeders is grid_service.n_feeders
    for cfg in (CFG33, CITY):
        assert pf.n_feeders(cfg.grid) == len(pf.build_feeders(cfg.grid).feeders)
    assert set(pf.__all__) >= {"RetryPolicy", "ActorGridFactory", "PowerFlowService", "make_grid", "grid_key"}


def test_service_micro_batches_clients_in_process():
    """Concurrent requests of 4 clients become one solve per step; each client gets its solo answer, warm
    starts kept apart (one client resets mid-run: warm and cold clients share a batch)."""
    c = case("ieee33_pv")
    svc = pf.PowerFlowService(c.grid, max_wait_ms=200.0)
    f = c.feeders[0]
    batch = {"a": 3, "b": 1, "c": 8, "d": 2}
    solo = {k: LocalGrid(c.feeders, c.grid) for k in batch}
    rngs = {k: np.random.default_rng(i) for i, k in enumerate(batch)}

    async def step(reset: set[str]):
        ins = {k: requests(f, b, rngs[k]) for k, b in batch.items()}
        out = await asyncio.gather(*(svc.solve(k, 0, *ins[k], cold=k in reset) for k in batch))
        for k, got in zip(batch, out):
            if k in reset:
                solo[k].reset()
            _assert_close(got, solo[k].solve(0, *ins[k]), BATCHED_PU, BATCHED_KW)
            assert got.flow.state is None  # the warm start stays in the service

    async def run():
        for t in range(4):
            await step({"b"} if t == 2 else set())

    asyncio.run(run())
    s = asyncio.run(svc.stats())
    assert s["requests"] == 16 and s["solves"] == 4 and s["max_requests_per_solve"] == 4
    assert s["warm_states"] == 4 and s["requests_per_node"] == {k: 4 for k in batch}
    assert asyncio.run(svc.forget("a")) == 1 and asyncio.run(svc.stats())["warm_states"] == 3


def test_service_bounds_its_warm_states():
    c = case("ieee33")
    svc = pf.PowerFlowService(c.grid, micro_batching=False, max_warm_states=2)
    rng = np.random.default_rng(5)
    for k in "abc":
        asyncio.run(svc.solve(k, 0, *requests(c.feeders[0], 1, rng)))
    assert asyncio.run(svc.stats())["warm_states"] == 2


def test_service_rejects_bad_requests():
    c = case("ieee33")
    svc = pf.PowerFlowService(c.grid, micro_batching=False)
    p, q, fc, fv, fg = requests(c.feeders[0], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="f: feeder 1 is not served by shard 0 of 1"):
        asyncio.run(svc.solve("x", 1, p, q, fc, fv, fg))
    with pytest.raises(ValueError, match=r"q_kvar: expected shape \(2, 33\) like p_kw"):
        asyncio.run(svc.solve("x", 0, p, q[:1], fc, fv, fg))
    with pytest.raises(ValueError, match="flex_gen_kw: expected values >= 0"):
        asyncio.run(svc.solve("x", 0, p, q, fc, fv, -fg - 1))
    with pytest.raises(ValueError, match=r"payload: expected a pickled \(5, batch, n_bus\) array"):
        asyncio.run(svc.solve_packed("x", 0, pickle.dumps(np.stack([p, q, fc, fv]))))
    for kw, match in ((dict(max_wait_ms=-1), r"max_wait_ms: expected a finite number in \[0.0, 1000.0\]"),
                      (dict(max_batch_requests=0), r"max_batch_requests: expected an integer in \[1, 4096\]"),
                      (dict(max_warm_states=0), r"max_warm_states: expected an integer in \[1, inf\]"),
                      (dict(n_shards=2), r"n_shards: expected an integer in \[1, 1\]")):
        with pytest.raises(ValueError, match=match):
            pf.PowerFlowService(c.grid, **kw)
    with pytest.raises(ValueError, match=r"num_actors: expected an integer in \[1, 2\]"):
        pf.get_or_create_actor(CITY, num_actors=3)


def test_channel_serves_the_service_in_process(tmp_path, monkeypatch):
    """The same-node channel end to end without Ray: the service's socket answers a client's frames with
    LocalGrid's answer, and a bad request with the service's error; the node comes from the constructor."""
    monkeypatch.setattr(transport.tempfile, "gettempdir", lambda: str(tmp_path))
    c = case("ieee33_pv")
    svc = pf.PowerFlowService(c.grid, micro_batching=False, node_id="node-a")
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    try:
        info = asyncio.run_coroutine_threadsafe(svc.channel(), loop).result(60)
        assert info["node"] == "node-a" and info["path"].startswith(str(tmp_path))
        ch = transport.Channel(info["path"], timeout_s=60.0)
        arrays = requests(c.feeders[0], 2, np.random.default_rng(6))
        seq = ch.send(transport.dumps(("node-a:x", 0, np.stack(arrays), False)))
        ok, sol = pickle.loads(ch.receive(seq))
        assert ok
        _assert_close(sol, LocalGrid(c.feeders, c.grid).solve(0, *arrays), 0.0, 0.0)
        seq = ch.send(transport.dumps(("node-a:x", 3, np.stack(arrays), False)))
        ok, err = pickle.loads(ch.receive(seq))
        assert not ok and isinstance(err, ValueError) and "f: feeder 3 is not served" in str(err)
        ch.close()
        assert asyncio.run_coroutine_threadsafe(svc.stats(), loop).result(60)["socket_requests"] == 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)


def test_retry_policy_checks_its_fields():
    p = pf.RetryPolicy(max_retries=3, backoff_s=0.1, max_backoff_s=0.3)
    assert [p.wait_s(t) for t in (1, 2, 3, 4)] == [0.1, 0.2, 0.3, 0.3]
    for kw, match in ((dict(max_retries=-1), r"max_retries: expected an integer in \[0, 1000\]"),
                      (dict(max_retries=1.5), r"max_retries: expected an integer"),
                      (dict(backoff_s=61), r"backoff_s: expected a finite number in \[0.0, 60.0\]"),
                      (dict(backoff_s=1.0, max_backoff_s=0.5), r"max_backoff_s: expected a finite number in \[1.0, "
                                                               r"600.0\]"),
                      (dict(timeout_s=0), r"timeout_s: expected a finite number in \(0.0, 86400.0\]")):
        with pytest.raises(ValueError, match=match):
            pf.RetryPolicy(**kw)
    with pytest.raises(ValueError, match="retry: give a RetryPolicy or its fields as keywords, not both"):
        pf.PowerFlowClient(CFG33, retry=p, max_retries=2)
    with pytest.raises(ValueError, match="transport: expected one of 'auto', 'ray'"):
        pf.PowerFlowClient(CFG33, transport="tcp")
    with pytest.raises(TypeError):
        pf.RetryPolicy(retries=3)


class _FakeMethod:
    def remote(self, *args):
        return args


class _FakeHandle:
    solve_packed = _FakeMethod()


def _fake_client(max_retries: int) -> pf.PowerFlowClient:
    c = pf.PowerFlowClient.__new__(pf.PowerFlowClient)
    c.__dict__.update(grid=CFG33.grid, name="fake", namespace=NS, retries=0, n_shards=1, n_feeders=1, _n_bus={0: 33},
                      retry=pf.RetryPolicy(max_retries=max_retries, backoff_s=0.0, max_backoff_s=0.0),
                      _handles=[_FakeHandle()], _transport="ray")
    c._new_identity()
    return c


def test_client_retries_then_gives_up(monkeypatch):
    """The retry loop itself, deterministic: failures of a dying actor are re-sent, others are not."""
    failures = []
    answer = pickle.dumps("solved")

    def fake_get(ref, timeout=None):
        if failures:
            raise failures.pop(0)
        return answer

    monkeypatch.setattr(client_mod.ray, "get", fake_get)
    monkeypatch.setattr(client_mod.ray, "get_actor", lambda *a, **k: _FakeHandle())
    args = requests(case("ieee33").feeders[0], 1, np.random.default_rng(0))
    c = _fake_client(max_retries=3)
    failures[:] = [ray.exceptions.ActorUnavailableError("restarting", None), ray.exceptions.ActorDiedError()]
    assert c.solve(0, *args) == "solved" and c.retries == 2
    failures[:] = [ray.exceptions.ActorDiedError()] * 4
    with pytest.raises(RuntimeError, match=r"'fake-0'.*4 tries in a row \(1 \+ max_retries=3\)"):
        c.solve(0, *args)
    failures[:] = [ValueError("p_kw: bad")]  # the actor's own error: not a fault to retry
    with pytest.raises(ValueError, match="p_kw"):
        c.solve(0, *args)
    failures[:] = [ray.exceptions.GetTimeoutError()]  # no answer in time: not re-sent
    with pytest.raises(RuntimeError, match="no answer for feeder 0 within timeout_s"):
        c.solve(0, *args)
    with pytest.raises(ValueError, match=r"f: expected an integer in \[0, 0\]"):
        c.solve(1, *args)
    with pytest.raises(ValueError, match=r"flex_v2g_kw: expected shape \(1, 33\) like p_kw"):  # found here
        c.solve(0, *args[:3], np.vstack([args[3], args[3]]), args[4])
    assert c.retries == 5


def test_channel_pairs_answers_with_requests_in_any_order(tmp_path):
    """The same-node socket's framing: answers come back out of order (two feeders of one shard), each reaches
    its own receive; a closed socket is a lost channel (retried), not a hang."""
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    frame = transport.FRAME

    def serve() -> None:
        conn, _ = srv.accept()
        frames = []
        for _ in range(2):
            seq, n = frame.unpack(conn.recv(frame.size, socket.MSG_WAITALL))
            frames.append((seq, conn.recv(n, socket.MSG_WAITALL)))
        for seq, body in frames[::-1]:
            answer = body.upper() * 1000  # longer than one recv
            conn.sendall(frame.pack(seq, len(answer)) + answer)
        conn.recv(frame.size + 5, socket.MSG_WAITALL)  # a third request: the "actor" dies without answering
        conn.close()

    th = threading.Thread(target=serve)
    th.start()
    ch = transport.Channel(path, timeout_s=10.0)
    first, second = ch.send(b"feeder 0"), ch.send(b"feeder 1")
    assert bytes(ch.receive(first)) == b"FEEDER 0" * 1000
    assert bytes(ch.receive(second)) == b"FEEDER 1" * 1000
    third = ch.send(b"again")
    th.join(10)
    with pytest.raises(transport.ChannelLost, match="closed the channel"):
        ch.receive(third)
    srv.close()
    with pytest.raises(transport.ChannelLost):
        transport.Channel(path, timeout_s=1.0)


def test_dead_channels_are_swept(tmp_path, monkeypatch):
    """Actors killed by Ray leave their channel directory behind; a new channel removes those whose socket
    refuses connections, and keeps live ones and ones too young to judge."""
    monkeypatch.setattr(transport.tempfile, "gettempdir", lambda: str(tmp_path))
    dirs = {k: tmp_path / f"{transport.CHANNEL_PREFIX}{k}" for k in ("dead", "live", "young", "empty")}
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
    assert transport.remove_dead_channels() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{transport.CHANNEL_PREFIX}live", f"{transport.CHANNEL_PREFIX}young", "unrelated"])
    for _, srv in servers:
        srv.close()


def test_make_grid_without_ray_is_local(monkeypatch, caplog):
    feeders = case("ieee33").feeders
    assert isinstance(pf.make_grid(CFG33, "local", feeders=feeders), LocalGrid)
    monkeypatch.setattr(client_mod.ray, "is_initialized", lambda: False)
    with caplog.at_level("WARNING", logger="evgrid.cluster.powerflow"):
        assert isinstance(pf.make_grid(CFG33, "actor", feeders=feeders), LocalGrid)
        assert isinstance(pf.ActorGridFactory()(CFG33.grid), LocalGrid)
    assert caplog.text.count("Ray is not initialised") == 2
    with pytest.raises(ValueError, match="mode: expected one of 'local', 'actor'"):
        pf.make_grid(CFG33, "remote")


def test_actor_grid_factory_is_picklable_and_checks_its_settings():
    f = pf.ActorGridFactory("t33", NS, transport="ray", max_retries=2)
    g = pickle.loads(pickle.dumps(f))
    assert (g.name, g.namespace, g.client_kwargs) == ("t33", NS, {"transport": "ray", "max_retries": 2})
    assert repr(g) == "ActorGridFactory(name='t33', namespace='evgrid-test-powerflow', transport='ray', max_retries=2)"
    with pytest.raises(ValueError, match="transport: expected one of"):
        pf.ActorGridFactory(transport="tcp")
    with pytest.raises(ValueError, match=r"max_retries: expected an integer in \[0, 1000\]"):
        pf.ActorGridFactory(max_retries=-1)
    with pytest.raises(TypeError):
        pf.ActorGridFactory(retries=3)


# ------------------------------------------------------------------------------------------ with Ray


class _ClientConformance(GridServiceConformance):
    """A client of the case's actors (two shards for the city) passes what LocalGrid passes, bit for bit."""

    cases = tuple(ACTOR_OF)
    transport = "auto"

    @pytest.fixture
    def service(self, actors, case):
        client = pf.PowerFlowClient(case.grid, name=ACTOR_OF[case.name], namespace=NS, transport=self.transport)
        yield client
        channels = [isinstance(ch, transport.Channel) for ch in client._channels]
        assert any(channels) if self.transport == "auto" else not any(channels), client._channels
        client.close()


class TestClientOverSocket(_ClientConformance):
    transport = "auto"


class TestClientOverRay(_ClientConformance):
    transport = "ray"


def test_sharding_routes_feeders_to_their_actor(actors):
    feeders = case("city2").feeders
    client = pf.PowerFlowClient(CITY, name="tcity", namespace=NS)
    assert client.n_shards == 2 and [client.shard_of(f) for f in (0, 1)] == [0, 1]
    client.stats(reset=True)
    local = LocalGrid(feeders, CITY.grid)
    rng = np.random.default_rng(2)
    for _ in range(3):
        ins = [requests(fd, 3, rng) for fd in feeders]
        pending = [client.submit(f, *ins[f]) for f in (0, 1)]  # both shards at once
        for f, req in enumerate(pending):
            _assert_close(req.result(), local.solve(f, *ins[f]), 0.0, 0.0)
    s0, s1 = client.stats()
    node = ray.get_runtime_context().get_node_id()
    assert s0["requests_per_feeder"] == {0: 3} and s1["requests_per_feeder"] == {1: 3}
    assert s0["requests_per_node"] == {node: 3} == s1["requests_per_node"]
    assert s0["socket_requests"] == 3 == s1["socket_requests"]  # transport "auto" on the actors' node
    assert s0["pid"] != s1["pid"]
    with pytest.raises(ValueError, match="already serves another grid or sharding"):
        pf.get_or_create_actor(CITY, name="tcity", namespace=NS, num_actors=1)
    with pytest.raises(ValueError, match=r"cfg: the grid differs .*\{'v_min_pu': \(0.9, 0.95\)\}"):
        pf.PowerFlowClient(load_config(None, {"grid": {"feeder": "city", "city_networks": 2, "v_min_pu": 0.9}}),
                           name="tcity", namespace=NS)


def test_micro_batching_concurrent_clients(actors):
    """4 driver threads, one client each, in lock-step: fewer solves than requests, solo answers per client."""
    n_client, steps = 4, 4
    c = case("ieee33_pv")
    clients = [pf.PowerFlowClient(c.grid, name="tpv", namespace=NS) for _ in range(n_client)]
    clients[0].configure(micro_batching=True, max_wait_ms=100.0)
    clients[0].stats(reset=True)
    rng = np.random.default_rng(3)
    ins = [[requests(c.feeders[0], 1 + i, rng) for _ in range(steps)] for i in range(n_client)]
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
        solo = LocalGrid(c.feeders, c.grid)
        for t in range(steps):
            _assert_close(got[i][t], solo.solve(0, *ins[i][t]), BATCHED_PU, BATCHED_KW)
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
        for name in ("vm_pu", "p_ev_kw", "curtail_kw", "res_curtail_kw"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        cut += float(b.curtail_kw.sum())
    assert cut > 0


def test_factory_and_make_grid_find_the_actors_or_fall_back(actors, caplog):
    factory = pickle.loads(pickle.dumps(pf.ActorGridFactory("t33", NS, transport="ray")))
    client = factory(CFG33.grid)
    assert isinstance(client, pf.PowerFlowClient) and client.transport == "ray" and client.name == "t33"
    client.close()
    with caplog.at_level("WARNING", logger="evgrid.cluster.powerflow"):
        assert isinstance(pf.make_grid(CFG33, "actor", name="absent", namespace=NS), LocalGrid)
        assert isinstance(pf.ActorGridFactory("absent", NS)(CFG33.grid, case("ieee33").feeders), LocalGrid)
    assert caplog.text.count("no power-flow actor 'absent-0'") == 2


def test_client_copy_is_another_client(actors):
    c = pf.PowerFlowClient(CFG33, name="t33", namespace=NS)
    d = pickle.loads(pickle.dumps(c))
    assert d.client_id != c.client_id and d.n_shards == c.n_shards and d.retry == c.retry


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


def test_actor_restart_then_dead(actors):
    """Last in the module: it kills t33.  Killed with a restart left: each client (same-node socket, Ray
    calls) re-sends and gets a (cold-started) correct answer.  Killed for good: each gives up after
    1 + max_retries tries with an error that names the actor."""
    c = case("ieee33")
    clients = [pf.PowerFlowClient(c.grid, name="t33", namespace=NS, backoff_s=0.2, transport=t)
               for t in ("auto", "ray")]
    local = LocalGrid(c.feeders, c.grid)
    rng = np.random.default_rng(4)
    ins = requests(c.feeders[0], 2, rng)
    for cl in clients:
        _assert_close(cl.solve(0, *ins), local.solve(0, *ins), 0.0, 0.0)
        local.reset()
    assert isinstance(clients[0]._channels[0], transport.Channel) and clients[1]._channels[0] is False
    handle = actors["t33"][0]
    pid0 = clients[0].stats()[0]["pid"]
    _kill(handle, pid0, no_restart=False)
    ins = requests(c.feeders[0], 2, rng)
    # Ray calls first: they meet the restarting actor (the socket client's channel stays broken anyway)
    for cl in clients[::-1]:
        got = cl.solve(0, *ins)
        local.reset()  # the restarted actor lost its warm start: compare with a cold solve
        _assert_close(got, local.solve(0, *ins), 0.0, 0.0)
        assert cl.retries >= 1
    pid1 = clients[0].stats()[0]["pid"]
    assert pid1 != pid0
    _kill(handle, pid1, no_restart=True)
    for cl in clients:
        cl.retry = pf.RetryPolicy(max_retries=2, backoff_s=0.05, max_backoff_s=0.05)
        with pytest.raises(RuntimeError, match=r"'t33-0' \(namespace 'evgrid-test-powerflow'\).*3 tries in a row"):
            cl.solve(0, *ins)
