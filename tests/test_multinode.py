"""A real two-node Ray cluster on this machine: `evgrid train --address` with env runners on both
nodes and the shared power-flow actor (``evgrid.cluster.powerflow``) serving them, over its same-node
socket and over Ray.  Starts and stops exactly its own nodes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

# `ray start` with loopback kept as given (Ray 2.60 would swap in the interface address)
RAY_START = ("import sys; from evgrid.cluster.runtime import keep_loopback_addresses; keep_loopback_addresses(); "
             "from ray.scripts.scripts import main; sys.argv = ['ray', 'start', *sys.argv[1:]]; main()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60 authenticates cluster RPCs with a token: one for this test's nodes and driver, none written to ~/.ray
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    env = ENV
    # its own session: the node's processes share a process group this test can stop, and nothing else
    return subprocess.Popen([sys.executable, "-c", RAY_START, "--block", "--node-ip-address=127.0.0.1", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on 127.0.0.1:{port} after {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_on_a_two_node_cluster_uses_both_nodes(tmp_path):
    port = _free_port()
    runner = json.dumps({"evgrid_runner": 1})
    # `ray start --head` records itself in /tmp/ray/ray_current_cluster: put back what was there
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.is_file() else None
    head = _start_node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                        f"--resources={runner}"], tmp_path / "head.log")
    nodes = [head]
    try:
        _wait_port(port)
        nodes.append(_start_node([f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--resources={runner}"],
                                 tmp_path / "worker.log"))
        time.sleep(5)  # the second raylet registers with the GCS
        run = tmp_path / "run"
        cmd = [sys.executable, "-m", "evgrid.cli", "train", "experiments/quickstart.yaml", "n_steps=24",
               "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", "train.iterations=2",
               "train.num_env_runners=2", "train.train_batch_size=96", "train.minibatch_size=48",
               "train.rollout_fragment_length=24", "train.num_epochs=1", "train.powerflow=actor",
               "train.env_runner_resources={evgrid_runner: 1}", "--address", f"127.0.0.1:{port}",
               "--run-dir", str(run)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        m = pd.read_parquet(run / "metrics.parquet")
        assert m.iteration.max() == 2 and m.env_steps.max() >= 96
        stats = json.loads((run / "powerflow_stats.json").read_text())
        per_node = stats[0]["requests_per_node"]
        assert len(per_node) == 2 and min(per_node.values()) > 0, per_node
        # transport "auto": the runner on the actor's node sends through its socket, the other one through Ray
        assert 0 < stats[0]["socket_requests"] < stats[0]["requests"], stats[0]
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)
    assert all(p.poll() is not None for p in nodes)
