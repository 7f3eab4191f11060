"""The command line: overrides anywhere after the command, bad input exits 2 with a message naming it before any
work starts (never a traceback), and Ray's own output goes to a log file, not the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evgrid import cli

RUNNERS = ("_run_demo", "_run_train", "_run_evaluate", "_run_sweep", "_run_bench")


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Every command stops after its checks (a runner reached returns 0 and is recorded); cwd is a fresh
    directory holding a file ``afile`` and an empty directory ``adir``."""
    reached: list[str] = []
    for name in RUNNERS:
        monkeypatch.setattr(cli, name, lambda args, name=name: reached.append(name) or 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    (tmp_path / "adir").mkdir()
    return reached


def test_overrides_stand_anywhere_after_the_command():
    # the README's order: options, then overrides
    a = cli.parse_args(["evaluate", "CONFIG", "--policy", "uncontrolled", "tou", "--episodes", "3", "fleet.n_ev=200"])
    assert (a.config, a.policy, a.episodes, a.overrides) == ("CONFIG", ["uncontrolled", "tou"], 3, ["fleet.n_ev=200"])
    a = cli.parse_args(["sweep", "quickstart", "n_steps=8", "--grid", "train.lr=1,2", "fleet.n_ev=3,4", "--seeds",
                        "2", "stations.ports=9"])
    assert a.grid == ["train.lr=1,2", "fleet.n_ev=3,4"] and a.overrides == ["n_steps=8", "stations.ports=9"]
    a = cli.parse_args(["train", "train.iterations=3", "--resume", "RUN"])
    assert (a.config, a.resume, a.overrides) == (None, "RUN", ["train.iterations=3"])
    a = cli.parse_args(["-v", "demo", "train.iterations=1", "--episodes", "1"])
    assert (a.what, a.verbose, a.overrides) == ("train", True, ["train.iterations=1"])
    assert cli.parse_args(["bench", "env", "-v", "--seed", "3"]).verbose


@pytest.mark.parametrize("argv,named", [
    (["evaluate", "quickstart", "--policy", "uncontrolled", "tou", "--episodes", "0"], "--episodes"),
    (["evaluate", "quickstart", "--seed", "-1"], "--seed"),
    (["evaluate", "quickstart", "grid=5"], "grid: expected a section"),
    (["evaluate", "quickstart", "grid.n_zones=40"], "grid.n_zones: expected an integer in [1, 33]"),
    (["evaluate", "quickstart", "--out", "afile"], "--out: cannot create the directory 'afile'"),
    (["evaluate", "quickstart", "--checkpoint", "adir"], "checkpoint: expected an RLlib algorithm checkpoint"),
    (["evaluate", "quickstart", "--policy", "greedy"], "invalid choice: 'greedy'"),
    (["evaluate", "nosuch.yaml"], "config: file 'nosuch.yaml' does not exist"),
    (["evaluate", "quickstart", "fleet.n_ev=["], "override 'fleet.n_ev=['"),
    (["bench", "powerflow", "--batch", "0"], "--batch: expected an integer"),
    (["bench", "powerflow", "--feeder", "nosuch"], "invalid choice: 'nosuch'"),
    (["bench", "train", "--envs-per-runner", "0"], "--envs-per-runner"),
    (["train", "quickstart", "grid=5"], "grid: expected a section"),
    (["train", "quickstart", "train.algorithm=APPO"], "expected one of PPO, IMPALA, DQN"),
    (["train", "quickstart", "train.hidden=5"], "train.hidden: expected a list of layer widths"),
    (["train", "quickstart", "--run-dir", "adir"], "run_dir: 'adir' exists"),
    (["train", "--resume", "adir"], "resume: expected a run directory"),
    (["train"], "config: give an experiment YAML"),
    (["train", "quickstart", "--address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1"),
    (["sweep", "quickstart", "--grid", "train.lr"], "grid 'train.lr'"),
    (["sweep", "quickstart", "--seeds", "0"], "--seeds"),
    (["demo", "fleet.n_ev=0"], "fleet.n_ev: expected an integer"),
    (["demo", "powerflow", "fleet.n_ev=5"], "demo powerflow takes none"),
])
def test_bad_input_exits_2_naming_it_before_any_work(no_work, capsys, argv, named):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert named in err and "Traceback" not in out + err
    assert no_work == [], "work started on bad input"


def test_verbose_shows_the_traceback(no_work):
    from evgrid.config import ConfigError

    with pytest.raises(ConfigError, match="grid.n_zones"):
        cli.main(["evaluate", "quickstart", "grid.n_zones=40", "-v"])


def test_config_errors_stop_training_before_ray_starts(monkeypatch, tmp_path, capsys):
    from evgrid.cluster import runtime

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started for a config that fails"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "quickstart", "grid.n_zones=40", "train.iterations=1"]) == 2
    assert "grid.n_zones" in capsys.readouterr().err and not (tmp_path / "runs").exists()


COMMON = ["quickstart", "seed002", "nosuch.yaml", "afile", "adir", "fleet.n_ev=50", "fleet.n_ev=0", "fleet.n_ev=abc",
          "fleet.n_ev=[", "grid=5", "grid.n_zones=40", "grid.n_zones=2", "n_steps=8", "nope=1", "fleet.nope=1",
          "train.iterations=1", "train.iterations=-1", "train.algorithm=APPO", "train.algorithm=DQN",
          "train.hidden=5", "train=3", "agents.ev_view=rule", "agents.operator=rule", "agents.station=rule",
          "log_dir=5", "a..b=1", "=1", "--frobnicate", "-x", "--", "-", "0", "3", "-1", "1e9", "", "--help"]
OPTIONS = {
    "evaluate": ["--policy", "uncontrolled", "tou", "llf", "greedy", "--episodes", "--seed", "--out", "--checkpoint"],
    "train": ["--run-dir", "--resume", "--address", "auto", "new_run"],
    "sweep": ["--grid", "train.lr=0.1,0.2", "train.lr", "fleet.n_ev=10,x", "--seeds", "--out", "--address", "auto"],
    "demo": ["train", "powerflow", "--config", "--episodes"],
    "bench": ["powerflow", "env", "actor", "train", "--batch", "--feeder", "ieee33", "cigre_mv", "nosuch", "--evs",
              "--steps", "--clients", "--calls", "--n-ev", "--envs-per-runner", "--min-time", "--views", "rule"],
}
ARGV = st.sampled_from(sorted(OPTIONS)).flatmap(lambda cmd: st.lists(
    st.sampled_from(OPTIONS[cmd] + COMMON) | st.text("abz=.-_0/", max_size=6), max_size=7).map(lambda t: [cmd, *t]))


def _named(argv: list[str]) -> set[str]:
    """What a message may name from the input: tokens, option names, override keys and their sections, or a
    positional argument that is missing (``config``, ``what``)."""
    names = {"config", "what"}
    for tok in argv[1:]:
        parts = tok.split("=", 1)[0].split(".")  # a key and the sections on its path
        names |= {tok, repr(tok), *(".".join(parts[:k]) for k in range(1, len(parts) + 1))} - {""}
    return names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=ARGV)
def test_any_command_line_exits_0_or_2_with_a_message_and_no_traceback(no_work, capsys, argv):
    capsys.readouterr()
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in out + err, argv
    if rc == 2:
        message = err.strip().splitlines()[-1]
        message = message.split(": ", 1)[1] if message.startswith("evgrid") else message
        assert any(n in message for n in _named(argv)), (argv, message)


def test_ray_output_goes_to_the_log_file_and_the_terminal_keeps_ours(tmp_path, capfd):
    from evgrid.cluster.runtime import ray_output_to

    log_file = tmp_path / "logs" / "ray.log"
    handlers, stderr = logging.getLogger("ray").handlers[:], sys.stderr
    with ray_output_to(log_file):
        logging.getLogger("ray.rllib").warning("rllib says hello")
        logging.getLogger("ray").info("ray is started")
        warnings.warn("a deprecation nobody asked for", UserWarning, stacklevel=1)
        os.write(2, b"[E core_worker.cc] straight to descriptor 2\n")
        print("progress bar", file=sys.stderr, flush=True)
    assert logging.getLogger("ray").handlers == handlers and sys.stderr is stderr  # all back as it was
    text = log_file.read_text()
    for line in ("rllib says hello", "ray is started", "a deprecation nobody asked for", "core_worker.cc"):
        assert line in text
    err = capfd.readouterr().err
    assert "progress bar" in err
    assert not any(s in err for s in ("rllib says", "core_worker", "deprecation nobody"))


@pytest.mark.slow
def test_train_shows_progress_and_results_only(tmp_path):
    """A real `evgrid train` process: Ray's notices, RLlib's warnings and the C++ core's lines land in
    logs/ray.log; the terminal shows the progress bar and the summary."""
    run = tmp_path / "run"
    small = ["n_steps=8", "start_hour=16.0", "fleet.n_ev=40", "stations.ports=20", "train.iterations=1",
             "train.num_env_runners=1", "train.train_batch_size=16", "train.minibatch_size=16",
             "train.rollout_fragment_length=8", "train.num_epochs=1"]
    done = subprocess.run([sys.executable, "-m", "evgrid.cli", "train", "quickstart", *small, "--run-dir", str(run)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout + done.stderr
    for noise in ("WARNING", "INFO", "core_worker", "Install gputil", "DeprecationWarning", "Token authentication"):
        assert noise not in terminal, terminal
    assert "train: 100%" in done.stderr and "run directory" in done.stdout
    assert "Started a local Ray instance" in (run / "logs" / "ray.log").read_text()



def test_training_commands_reexecute_with_the_reproducibility_pins(monkeypatch):
    """A training command's driver re-executes itself with the pinned numeric code paths and hash seed; a value
    the user set stands; other commands run as they are."""
    import os
    import sys

    from evgrid import cli
    from evgrid.cluster.environment import REPRODUCIBLE_ENV

    seen: dict = {}
    # a copy: the pins must not reach this process's later tests (a Ray worker started by one would inherit
    # NUMBA_CPU_NAME=generic and disagree in the last bits with the in-process reference)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(os, "execv", lambda exe, argv: seen.update(argv=argv, env=dict(os.environ)))
    for command, pinned in (("evaluate", False), ("train", True)):
        for k in REPRODUCIBLE_ENV:
            os.environ.pop(k, None)
        os.environ.pop("PYTHONHASHSEED", None)
        os.environ["MKL_CBWR"] = "AUTO"
        monkeypatch.setattr(sys, "argv", ["evgrid", command, "quickstart"])
        seen.clear()
        cli._pin_training_process()
        assert bool(seen) == pinned
    assert seen["argv"][1:] == ["-m", "evgrid.cli", "train", "quickstart"]
    env = seen["env"]
    assert env["MKL_CBWR"] == "AUTO" and env["PYTHONHASHSEED"] == "0"
    assert all(env[k] == v for k, v in REPRODUCIBLE_ENV.items() if k != "MKL_CBWR")


def test_pinned_ray_workers_get_the_reproducibility_settings():
    """Through runtime_env, as on a cluster's workers (a fresh process: its own embedded Ray)."""
    script = """
import json, os, ray
from evgrid.cluster.environment import REPRODUCIBLE_ENV
from evgrid.cluster.runtime import connect

@ray.remote(num_cpus=0)
def settings():
    return {k: os.environ.get(k) for k in REPRODUCIBLE_ENV}

with connect(pinned=True):
    print(json.dumps(ray.get(settings.remote()) == REPRODUCIBLE_ENV))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "NUMBA_CPU_NAME", "ATEN_CPU_CAPABILITY")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "true"
