"""The RLlib glue: the MultiAgentEnv adapter, the shared per-EV module and its masked distribution, one PPO
iteration training operators, stations and grouped EVs together, and the Experiment every command drives."""

from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from ray.rllib.core.columns import Columns
from ray.rllib.utils.pre_checks.env import check_multiagent_environments

from evgrid.agents.rllib.env import RLlibEVGrid, RLlibEVGridVector
from evgrid.agents.rllib.experiment import Experiment, ExperimentCallback, IterationSummary
from evgrid.agents.rllib.modules import SlotDistribution, SlotSetModule, module_specs, policy_mapping_fn

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

SMALL = {"n_steps": 24, "start_hour": 16.0, "fleet": {"n_ev": 120}, "stations": {"ports": 40}}


def _env_config(view):
    return {"config": "quickstart", "overrides": {**SMALL, "ev_view": view}}


@pytest.mark.parametrize("view", ["individual", "grouped"])
def test_adapter_passes_rllib_checks_and_ends_with_all(view):
    env = RLlibEVGrid({**_env_config(view), "state_in_infos": True})
    check_multiagent_environments(env)
    obs, infos = env.reset(seed=0)
    assert "state" in infos["__common__"]
    assert set(obs) == set(env.agents)
    spaces = env.action_spaces
    steps = 0
    while True:
        obs, rew, term, trunc, infos = env.step({a: spaces[a].sample() for a in env.agents})
        steps += 1
        assert term["__all__"] is False
        if trunc["__all__"]:
            break
    assert steps == SMALL["n_steps"] and env.agents == []


def test_vector_adapter_steps_together_resets_next_step_and_strides_seeds():
    from ray.rllib.env.env_context import EnvContext

    ctx = EnvContext(_env_config("grouped"), worker_index=1, num_workers=2)
    env = RLlibEVGridVector(ctx, num_envs=2)
    assert len(env.envs) == 2 and env.single_action_space.keys() == set(env.envs[0].possible_agents)
    obs, infos = env.reset(seed=5)
    assert len(obs) == 2 and set(obs[1]) == set(env.envs[1].agents)
    steps = 0
    while True:
        acts = [{a: env.single_action_spaces[a].sample() for a in view.agents} for view in env.envs]
        occupied = [sum(int(o[a]["mask"].sum()) for a in o if a.startswith("evs_")) for o in obs]
        obs, rew, term, trunc, infos = env.step(acts)
        steps += 1
        # the training callback's count: one decision per occupied slot
        assert [v.last_ev_decisions for v in env.envs] == occupied
        assert all(t["__all__"] is False for t in term)
        if all(t["__all__"] for t in trunc):
            break
        assert not any(t["__all__"] for t in trunc), "the environments of a vector end together"
    assert steps == SMALL["n_steps"]
    # the step after the end resets (RLlib's "next step" auto-reset), to seed 5 + (num_workers + 1)
    obs, rew, term, trunc, infos = env.step([{}, {}])
    assert rew == [{}, {}] and all(set(o) == set(v.agents) for o, v in zip(obs, env.envs))
    fresh = RLlibEVGridVector(ctx, num_envs=2)
    want, _ = fresh.reset(seed=8)
    for got, exp in zip(obs, want):
        for a in exp:
            np.testing.assert_array_equal(got[a]["evs"] if a.startswith("evs_") else got[a],
                                          exp[a]["evs"] if a.startswith("evs_") else exp[a])


def _slot_logits(n_batch, n_slot, mask):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n_batch, n_slot, 6, generator=g)
    p[..., -1] = mask
    return p.flatten(-2)


def test_slot_distribution_counts_occupied_slots_only():
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    d = SlotDistribution.from_logits(_slot_logits(1, 4, mask))
    a = d.sample()
    assert a["mode"].shape == (1, 4) and ((a["power"] > 0) & (a["power"] < 1)).all()
    b = {"mode": a["mode"].clone(), "power": a["power"].clone()}
    b["mode"][0, 1] = (b["mode"][0, 1] + 1) % 3  # change only empty slots
    b["power"][0, 3] = 0.01
    assert torch.allclose(d.logp(a), d.logp(b))
    full = SlotDistribution.from_logits(_slot_logits(1, 4, torch.ones(1, 4)))
    assert d.entropy().item() < full.entropy().item()
    assert torch.allclose(d.kl(d), torch.zeros(1), atol=1e-6)
    # the log-probability is the sum of the occupied slots' log-probabilities
    single = [SlotDistribution.from_logits(_slot_logits(1, 4, torch.eye(4)[k:k + 1])) for k in (0, 2)]
    assert torch.allclose(d.logp(a), single[0].logp(a) + single[1].logp(a), atol=1e-5)


def _module(n_slot=5, n_feat=13, n_ctx=10):
    obs = gym.spaces.Dict({"evs": gym.spaces.Box(-np.inf, np.inf, (n_slot, n_feat), np.float32),
                           "mask": gym.spaces.Box(0, 1, (n_slot,), np.float32),
                           "context": gym.spaces.Box(-np.inf, np.inf, (n_ctx,), np.float32)})
    act = gym.spaces.Dict({"mode": gym.spaces.MultiDiscrete([3] * n_slot),
                           "power": gym.spaces.Box(0, 1, (n_slot,), np.float32)})
    torch.manual_seed(0)
    m = SlotSetModule(observation_space=obs, action_space=act, model_config={"hidden": [16, 16]})
    # non-zero policy head so the test sees slot-dependent outputs
    torch.nn.init.normal_(m.pi_head.weight)
    return m


def test_shared_per_ev_network_is_permutation_equivariant_and_ignores_empty_slots():
    m = _module()
    evs = torch.randn(2, 5, 13)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0, 0.0]])
    ctx = torch.randn(2, 10)
    batch = {Columns.OBS: {"evs": evs, "mask": mask, "context": ctx}}
    out = m.forward_train(batch)[Columns.ACTION_DIST_INPUTS].reshape(2, 5, 6)
    perm = torch.tensor([4, 2, 0, 1, 3])
    pb = {Columns.OBS: {"evs": evs[:, perm], "mask": mask[:, perm], "context": ctx}}
    out_p = m.forward_train(pb)[Columns.ACTION_DIST_INPUTS].reshape(2, 5, 6)
    assert torch.allclose(out[:, perm], out_p, atol=1e-6)
    v = m.compute_values(batch)
    assert torch.allclose(v, m.compute_values(pb), atol=1e-6)
    # what sits in an empty slot does not move the value
    evs2 = evs.clone()
    evs2[mask == 0] = 100.0
    assert torch.allclose(v, m.compute_values({Columns.OBS: {"evs": evs2, "mask": mask, "context": ctx}}), atol=1e-6)


def _reference_outputs(m, batch):
    """The module written the plain way: every slot through ev_net, empty ones zeroed, a masked mean."""
    obs = batch[Columns.OBS]
    evs, mask, ctx = obs["evs"], obs["mask"], obs["context"]
    x = torch.cat([evs, ctx.unsqueeze(1).expand(-1, evs.shape[1], -1)], dim=-1)
    h = m.ev_net(x) * mask.unsqueeze(-1)
    params = torch.cat([m.pi_head(h), mask.unsqueeze(-1)], dim=-1).flatten(-2)
    pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return params, m.vf_net(torch.cat([pooled, ctx], dim=-1)).squeeze(-1)


def _reference_dists(params):
    p = params.reshape(params.shape[0], -1, 6)
    cat = torch.distributions.Categorical(logits=p[..., :3])
    beta = torch.distributions.Beta(torch.nn.functional.softplus(p[..., 3]) + 1,
                                    torch.nn.functional.softplus(p[..., 4]) + 1)
    return cat, beta, p[..., 5] > 0


def test_slot_module_and_distribution_match_a_plain_torch_reference():
    """Random sets with random masks (one row all empty): dist inputs, values, log-prob, entropy, KL and their
    gradients equal torch.distributions summed over occupied slots only; samples follow the distribution."""
    m = _module(n_slot=7)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(4, 7, generator=g) < 0.6).float()
    mask[1] = 0.0
    mask[2] = 1.0
    batch = {Columns.OBS: {"evs": torch.randn(4, 7, 13, generator=g), "mask": mask,
                           "context": torch.randn(4, 10, generator=g)}}
    out = m.forward_train(batch)
    ref_params, ref_v = _reference_outputs(m, batch)
    assert torch.allclose(out[Columns.ACTION_DIST_INPUTS], ref_params, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(m.forward_exploration(batch)[Columns.ACTION_DIST_INPUTS], ref_params, atol=1e-5)
    for v in (m.compute_values(batch), m.compute_values(batch, embeddings=out.get(Columns.EMBEDDINGS))):
        assert torch.allclose(v, ref_v, atol=1e-5)

    torch.manual_seed(0)
    acts = SlotDistribution.from_logits(ref_params.detach()).sample()
    assert acts["mode"].dtype == torch.int64 and acts["mode"].shape == acts["power"].shape == (4, 7)
    assert acts["mode"].min() >= 0 and acts["mode"].max() <= 2
    assert ((acts["power"] > 0) & (acts["power"] < 1)).all()
    prev = ref_params.detach() + 0.3 * torch.randn(ref_params.shape, generator=g)
    prev.view(4, 7, 6)[..., 5] = mask

    def losses(params):
        d, d_prev = SlotDistribution.from_logits(params), SlotDistribution.from_logits(prev)
        return d.logp(acts), d.entropy(), d_prev.kl(d)

    def ref_losses(params):
        (cat, beta, occ), (cat0, beta0, _) = _reference_dists(params), _reference_dists(prev)
        kl = torch.distributions.kl_divergence(cat0, cat) + torch.distributions.kl_divergence(beta0, beta)
        terms = (cat.log_prob(acts["mode"]) + beta.log_prob(acts["power"]), cat.entropy() + beta.entropy(), kl)
        return tuple(torch.where(occ, t, 0.0).sum(-1) for t in terms)

    got, want = losses(out[Columns.ACTION_DIST_INPUTS]), ref_losses(ref_params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert a[1] == 0.0  # the all-empty row
    # gradients of a PPO-like loss reach the same parameters with the same values
    grads = []
    for lp, ent, kl, v in ((*got, m.compute_values(batch, embeddings=out[Columns.EMBEDDINGS])), (*want, ref_v)):
        m.zero_grad()
        (lp.sum() - 0.1 * ent.sum() + kl.sum() + v.pow(2).sum()).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[1]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5), k

    # samples follow the distribution: mode frequencies and Beta means of the occupied slots
    d = SlotDistribution.from_logits(ref_params.detach()[2:3])
    s = d.sample(sample_shape=(20000,))
    cat, beta, _ = _reference_dists(ref_params.detach()[2:3])
    freq = torch.nn.functional.one_hot(s["mode"], 3).float().mean(0)
    assert torch.allclose(freq, cat.probs, atol=0.02)
    assert torch.allclose(s["power"].mean(0), beta.mean, atol=0.01)
    assert torch.allclose(s["power"].var(0), beta.variance, atol=0.01)
    # a greedy policy takes the likeliest mode and the Beta mean
    greedy = d.to_deterministic().sample()
    assert torch.equal(greedy["mode"], cat.probs.argmax(-1)) and torch.allclose(greedy["power"], beta.mean)


def test_slot_module_parameters_keep_their_names_and_shapes():
    """Checkpoints stay loadable."""
    assert {k: tuple(v.shape) for k, v in _module(n_slot=7).state_dict().items()} == {
        "ev_net.0.weight": (16, 23), "ev_net.0.bias": (16,), "ev_net.2.weight": (16, 16), "ev_net.2.bias": (16,),
        "pi_head.weight": (5, 16), "pi_head.bias": (5,), "vf_net.0.weight": (16, 26), "vf_net.0.bias": (16,),
        "vf_net.2.weight": (16, 16), "vf_net.2.bias": (16,), "vf_net.4.weight": (1, 16), "vf_net.4.bias": (1,)}


def test_one_ppo_iteration_trains_all_three_levels(ray_local):
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env("evgrid-test", lambda c: RLlibEVGrid(c))
    env_config = _env_config("grouped")
    specs = module_specs(RLlibEVGrid(env_config))
    assert set(specs.rl_module_specs) == {"operator", "station", "ev"}
    cfg = (PPOConfig()
           .environment("evgrid-test", env_config=env_config, normalize_actions=False, clip_actions=True)
           .env_runners(num_env_runners=0, rollout_fragment_length=48)
           .multi_agent(policies=set(specs.rl_module_specs), policy_mapping_fn=policy_mapping_fn)
           .rl_module(rl_module_spec=specs)
           .training(train_batch_size_per_learner=96, minibatch_size=48, num_epochs=1))
    algo = cfg.build_algo()
    try:
        before = {k: v.detach().clone() for k, v in algo.get_module("ev").state_dict().items()}
        r = algo.train()
        after = algo.get_module("ev").state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), "the shared per-EV network did not learn"
        for mid in ("operator", "station", "ev"):
            assert np.isfinite(r["learners"][mid]["total_loss"])
    finally:
        algo.stop()


def test_train_cli_checkpoints_and_resumes_without_losing_iterations(tmp_path, ray_local, monkeypatch):
    import pandas as pd

    from evgrid.cli import main

    monkeypatch.chdir(tmp_path)  # any directory: the config is the shipped quickstart

    run = tmp_path / "run"
    small = ["n_steps=24", "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", "train.num_env_runners=0",
             "train.train_batch_size=48", "train.minibatch_size=24", "train.rollout_fragment_length=48",
             "train.num_epochs=1", "train.checkpoint_every=1"]
    assert main(["train", "quickstart", *small, "train.iterations=2", "--run-dir", str(run)]) == 0
    for name in ("config.yaml", "metrics.parquet", "summary.md", "learning_curves.png"):
        assert (run / name).is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002"]
    assert main(["train", "train.iterations=3", "--resume", str(run)]) == 0
    m = pd.read_parquet(run / "metrics.parquet")
    assert sorted(m.iteration.unique()) == [1, 2, 3]
    assert set(m.module) == {"operator", "station", "ev"}
    env_steps = m.groupby("iteration").env_steps.first()
    assert env_steps.is_monotonic_increasing and env_steps.iloc[-1] > env_steps.iloc[1]
    assert (m.ev_decisions > 0).all()
    assert (run / "logs" / "ray.log").is_file()  # Ray's and RLlib's own messages
    # the grouped EVs' shared module acts greedily in `evgrid evaluate`
    env_only = [o for o in small if not o.startswith("train.")]
    assert main(["evaluate", "quickstart", "--checkpoint", str(run), "--policy", "tou", "--episodes", "1",
                 *env_only, "--out", str(tmp_path / "eval")]) == 0
    assert list(pd.read_parquet(tmp_path / "eval" / "metrics.parquet").policy) == ["trained", "tou"]


class _Calls(ExperimentCallback):
    def __init__(self):
        self.calls = []

    def on_setup(self, experiment):
        self.calls.append("setup")

    def on_iteration(self, experiment, summary):
        self.calls.append(("iteration", summary.iteration))

    def on_checkpoint(self, experiment, path):
        self.calls.append(("checkpoint", path.name))

    def on_close(self, experiment):
        self.calls.append("close")


# operators and stations learned with discrete levels, EVs on their rule: what DQN can train
DQN_ENV = ["n_steps=8", "start_hour=16.0", "fleet.n_ev=40", "stations.ports=20", "agents.operator_action=level",
           "agents.ev_view=rule"]


def test_experiment_trains_checkpoints_restores_and_evaluates_dqn(tmp_path, ray_local):
    """One Experiment loop end to end on DQN, whose modules pick greedy actions themselves (no action
    distribution inputs): its live modules, a restored copy and `evgrid evaluate --checkpoint` agree."""
    import dataclasses

    import pandas as pd

    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.cli import main

    env_cfg, train_cfg = load_run_config("quickstart", [
        *DQN_ENV, "train.algorithm=DQN", "train.num_env_runners=0", "train.train_batch_size=16",
        "train.minibatch_size=16", "train.rollout_fragment_length=8", "train.iterations=1"])
    calls = _Calls()
    run = tmp_path / "run"
    with Experiment(env_cfg, train_cfg, run, callbacks=[calls]) as exp:
        s = exp.step()
        assert isinstance(s, IterationSummary) and s.iteration == 1 and set(s.returns) == {"operator", "station"}
        with pytest.raises(dataclasses.FrozenInstanceError):
            s.iteration = 2
        assert exp.checkpoint() == run / "checkpoints" / "iter_000001"
        live = pd.DataFrame(exp.evaluate(episodes=1, seed=3))
    assert calls.calls == ["setup", ("iteration", 1), ("checkpoint", "iter_000001"), "close"]
    for name in ("config.yaml", "metrics.parquet", "summary.md", "learning_curves.png"):
        assert (run / name).is_file(), name
    assert list(live.policy) == ["trained"] and np.isfinite(live.operator_cost).all()
    with Experiment(env_cfg, train_cfg) as again:
        assert again.restore(run) == 1
        assert pd.DataFrame(again.evaluate(episodes=1, seed=3)).equals(live)
    logs = tmp_path / "logs"
    assert main(["evaluate", "quickstart", *DQN_ENV, "--checkpoint", str(run), "--policy", "uncontrolled",
                 "--episodes", "1", "--seed", "3", "--out", str(tmp_path / "eval"), f"log_dir={logs}"]) == 0
    m = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    assert list(m.policy) == ["trained", "uncontrolled"]
    assert m.operator_cost.iloc[0] == pytest.approx(live.operator_cost.iloc[0])
    for policy in ("trained", "uncontrolled"):  # each policy's step and session logs
        assert len(pd.read_parquet(logs / policy / "steps.parquet")) == 8
        assert (logs / policy / "sessions.parquet").is_file()


def test_dqn_trainings_with_one_seed_learn_the_same_weights(ray_local):
    """RLlib seeds its replay buffer from the OS: before ``prepare_algorithm`` re-seeded it from the config's
    seed, two such trainings replayed different minibatches and parted after the first update."""
    from evgrid.agents.rllib.algos import load_run_config

    def weights(exp: Experiment) -> dict[str, torch.Tensor]:
        return {f"{m}/{k}": v.detach().clone() for m, module in exp.modules().items()
                for k, v in module.state_dict().items()}

    env_cfg, train_cfg = load_run_config("quickstart", [
        *DQN_ENV, "train.algorithm=DQN", "train.num_env_runners=0", "train.train_batch_size=16",
        "train.minibatch_size=16", "train.rollout_fragment_length=8", "train.learning_starts=8"])
    trained = []
    for _ in range(2):
        with Experiment(env_cfg, train_cfg) as exp:
            initial = weights(exp)
            exp.step()
            trained.append(weights(exp))
    a, b = trained
    assert any(not torch.equal(initial[k], b[k]) for k in b)  # it learned
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iteration_timings_are_that_iterations_own(ray_local, monkeypatch):
    """`sample_s` and `learn_s` time the iteration they are reported for: RLlib's own timers are an EMA
    (coefficient 0.01) that a slow first iteration (module build, compiles) dominated for a hundred more."""
    from evgrid.agents.rllib.algos import load_run_config

    delay_s = {"now": 0.05}
    step = RLlibEVGridVector.step

    def slow_step(self, actions):
        time.sleep(delay_s["now"])
        return step(self, actions)

    monkeypatch.setattr(RLlibEVGridVector, "step", slow_step)
    env_cfg, train_cfg = load_run_config("quickstart", [
        *DQN_ENV, "train.num_env_runners=0", "train.train_batch_size=8", "train.minibatch_size=8",
        "train.num_epochs=1", "train.rollout_fragment_length=8"])
    with Experiment(env_cfg, train_cfg) as exp:
        first = exp.step()
        delay_s["now"] = 0.0
        later = [exp.step() for _ in range(2)]
    assert first.sample_s >= 8 * 0.05, "the first iteration's 8 delayed env steps"
    for s in later:
        assert 0 < s.sample_s < first.sample_s - 8 * 0.05 * 0.9
        assert s.sample_s + s.learn_s <= s.wall_s


@pytest.mark.slow
def test_same_seed_same_training_run(tmp_path):
    """Two `evgrid train` processes with one seed learn the same thing.  Without a fixed string-hash seed in
    every process (RLlib orders agents by iterating sets of their ids) the returns differ from the first
    iteration: each run gets its own random PYTHONHASHSEED here, as from a shell."""
    import subprocess
    import sys

    import pandas as pd

    small = ["n_steps=24", "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", "train.iterations=2",
             "train.train_batch_size=96", "train.minibatch_size=48", "train.rollout_fragment_length=24",
             "train.num_epochs=1"]
    runs = []
    for k in range(2):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        done = subprocess.run([sys.executable, "-m", "evgrid.cli", "train", "quickstart", *small,
                               "--run-dir", str(tmp_path / f"run{k}")], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        m = pd.read_parquet(tmp_path / f"run{k}" / "metrics.parquet")
        runs.append(m.set_index(["iteration", "module"])[["return_mean", "ev_decisions"]].sort_index())
    pd.testing.assert_frame_equal(runs[0], runs[1])


@pytest.mark.parametrize("algorithm,view,k,extra", [
    ("PPO", "individual", 2, []),
    ("IMPALA", "grouped", 1, []),
    pytest.param("IMPALA", "individual", 2, [], marks=pytest.mark.slow),  # ~33 s; the default suite keeps ~10 min
    ("DQN", "rule", 1, ["agents.operator_action=level"]),
])
def test_every_algorithm_trains_every_ev_view_it_supports(tmp_path, ray_local, algorithm, view, k, extra):
    """PPO grouped runs in the CLI test above; DQN takes discrete levels only (the EV views are refused)."""
    import pandas as pd

    from evgrid.cluster.runtime import train

    out = train("quickstart",
                ["n_steps=24", "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", f"train.algorithm={algorithm}",
                 f"agents.ev_view={view}", "train.iterations=2", "train.num_env_runners=0",
                 f"train.envs_per_runner={k}", f"train.train_batch_size={48 * k}", "train.minibatch_size=24",
                 "train.rollout_fragment_length=24", *extra], run_dir=tmp_path / "run", progress=False)
    m = pd.read_parquet(out / "metrics.parquet")
    assert m.iteration.max() == 2 and m.env_steps.max() > 0
    assert np.isfinite(m.return_mean).all()
    assert ((m.ev_decisions > 0) if view != "rule" else (m.ev_decisions == 0)).all()
    assert ("ev" in set(m.module)) == (view != "rule")


def test_envs_of_a_runner_share_one_actor_call_per_step(ray_local):
    """powerflow: actor with 3 environments per runner: every request to the actor carries all 3 scenarios."""
    import ray

    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.agents.rllib.experiment import Experiment
    from evgrid.cluster.runtime import powerflow_factory, start_powerflow_actors

    env_cfg, train_cfg = load_run_config("quickstart", [
        "n_steps=24", "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", "train.powerflow=actor",
        "train.num_env_runners=0", "train.envs_per_runner=3", "train.train_batch_size=72", "train.minibatch_size=24",
        "train.rollout_fragment_length=24", "train.num_epochs=1"])
    handle = start_powerflow_actors(env_cfg, train_cfg)[0]
    try:
        with Experiment(env_cfg, train_cfg, grid_factory=powerflow_factory(train_cfg)) as exp:
            exp.step()
            stats = ray.get(handle.stats.remote())
    finally:
        ray.kill(handle, no_restart=True)
    assert stats["requests"] >= 24
    assert stats["scenarios"] == 3 * stats["requests"]


def test_dqn_and_appo_are_refused_where_they_cannot_run():
    from evgrid.agents.rllib.algos import TrainConfig, algo_config
    from evgrid.envs.config import load_config

    with pytest.raises(ValueError, match="algorithm: APPO's checkpoints hang.*expected one of PPO, IMPALA, DQN"):
        TrainConfig(algorithm="APPO")
    with pytest.raises(ValueError, match="DQN needs discrete actions"):
        algo_config(load_config("quickstart"), TrainConfig(algorithm="DQN"))


@pytest.mark.parametrize("overrides,address,match", [
    (["train.algorithm=A2C"], None, "train.algorithm: RLlib 2.60 has no A2C"),
    (["train.algorithm=SAC"], None, "train.algorithm: expected one of"),
    (["agents.station=rule", "train.hidden_per_level={station: [32]}"], None,
     r"train\.hidden_per_level\.station: the station level runs its rule"),
    (["agents.operator=rule", "agents.station=rule", "agents.ev_view=rule"], None, "nothing to train"),
    (["train.algorithm=DQN"], None, "DQN needs discrete actions"),
    ([], "127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1"),
])
def test_bad_runs_fail_before_ray_starts(tmp_path, monkeypatch, overrides, address, match):
    from evgrid.cluster import runtime
    from evgrid.config import ConfigError

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started for a run that cannot work"))
    with pytest.raises((ConfigError, ConnectionError), match=match):
        runtime.train("quickstart", overrides, address=address, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_per_level_widths_reach_their_modules():
    from evgrid.agents.rllib.algos import TrainConfig, algo_config
    from evgrid.envs.config import load_config

    env = load_config("quickstart", {"fleet": {"n_ev": 50}})
    cfg = algo_config(env, TrainConfig(hidden=(32, 32), hidden_per_level={"ev": (16,)}))
    specs = cfg.rl_module_spec.rl_module_specs
    assert specs["ev"].model_config["hidden"] == [16]
    assert specs["operator"].model_config["fcnet_hiddens"] == [32, 32]


@pytest.mark.slow  # ~31 s
def test_training_survives_the_power_flow_actor_being_killed(tmp_path, ray_local):
    """powerflow: actor; the actor is killed between iterations (Ray restarts it) and training continues.
    With ``log_dir``, the env runner logs its episodes to a directory of its own."""
    import ray

    from evgrid.agents.rllib.algos import load_run_config
    from evgrid.agents.rllib.experiment import Experiment
    from evgrid.cluster import powerflow as pf
    from evgrid.cluster.runtime import powerflow_factory

    env_cfg, train_cfg = load_run_config("quickstart", [
        "n_steps=24", "start_hour=16.0", "fleet.n_ev=100", "stations.ports=40", "train.powerflow=actor",
        "train.num_env_runners=1", "train.train_batch_size=48", "train.minibatch_size=24",
        "train.rollout_fragment_length=24", "train.num_epochs=1", f"log_dir={tmp_path / 'logs'}"])
    handle = pf.get_or_create_actor(env_cfg, max_restarts=2)[0]
    try:
        with Experiment(env_cfg, train_cfg, grid_factory=powerflow_factory(train_cfg)) as exp:
            exp.step()
            before = ray.get(handle.stats.remote())
            assert before["requests"] > 0, "the env runner did not use the shared actor"
            ray.kill(handle, no_restart=False)
            s = exp.step()  # the clients retry through the restart
            assert s.env_steps >= 96
            after = ray.get(handle.stats.remote())
            # a new process, whose counters only know the iteration after the kill
            assert after["pid"] != before["pid"] and after["requests"] > 0
        assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["runner-1"]
        steps = pq.read_table(tmp_path / "logs" / "runner-1" / "steps.parquet")
        assert set(steps.column("t").to_pylist()) == set(range(24)), "a whole episode"
    finally:
        for h in pf.get_or_create_actor(env_cfg):
            ray.kill(h, no_restart=True)


@pytest.mark.slow  # ~40 s: the default suite stays under ~10 min on 2 cores
def test_sweep_grid_times_seeds_lands_in_one_table(tmp_path, ray_local):
    import pandas as pd

    from evgrid.cluster.sweeps import parse_grid, sweep

    grid = parse_grid(["train.lr=0.0003,0.001"])
    assert grid == {"train.lr": [0.0003, 0.001]}
    out = sweep("quickstart", grid, seeds=2, out_dir=tmp_path, overrides=[
        "n_steps=24", "start_hour=16.0", "fleet.n_ev=80", "stations.ports=40", "train.iterations=1",
        "train.num_env_runners=0", "train.train_batch_size=24", "train.minibatch_size=24",
        "train.rollout_fragment_length=24", "train.num_epochs=1", "agents.ev_view=grouped"])
    t = pd.read_parquet(out / "sweep.parquet")
    assert len(t.trial.unique()) == 4
    assert sorted(t.groupby(["train.lr", "seed"]).size().index.tolist()) == [(0.0003, 0), (0.0003, 1), (0.001, 0),
                                                                            (0.001, 1)]
    assert {"return_ev", "agent_steps_ev", "env_steps", "elapsed_s", "iteration"} <= set(t.columns)
    assert (tmp_path / "logs" / "ray.log").is_file()


@pytest.mark.slow  # ~40 s: the default suite stays under ~10 min on 2 cores
def test_training_and_actor_benchmarks_report_their_fields(ray_local, tmp_path, monkeypatch):
    """`evgrid bench train` and `bench actor` (tiny budgets, from any directory): the JSON fields the targets
    are read from."""
    from evgrid.bench import bench_actor, bench_actor_sampling, bench_train

    monkeypatch.chdir(tmp_path)

    rows = bench_train(("grouped", "individual"), n_ev=40, envs_per_runner=2, iterations=1, min_sample_s=0.0)
    g, i = rows
    for r in rows:
        assert r["ev_decisions_per_step"] == 40.0, "every EV of the evening fleet decides at every step"
        assert r["ev_decisions_per_s"] > 0 and 0 < r["env_share_of_sampling"] < 1 and r["learn_s"] > 0
    # (the ratio is rounded to 3 decimals: an absolute tolerance, since a relative one fails on small ratios)
    assert g["ev_decisions_vs_individual"] == pytest.approx(g["ev_decisions_per_s"] / i["ev_decisions_per_s"],
                                                            abs=6e-4)
    local, sock, rayc = bench_actor_sampling(2, n_ev=60, steps=8, repeats=1)
    assert [(r["mode"], r["transport"]) for r in (local, sock, rayc)] == [("local", None), ("actor", "socket"),
                                                                           ("actor", "ray")]
    for actor in (sock, rayc):  # (the bench checks the actor's socket counter against the row's transport)
        assert actor["actor_requests_per_step"] == 1.0, "the runner's environments share one actor call per step"
        assert 0 < actor["vs_local"] < 10
    calls = bench_actor((1, 2), (1, 4), calls=5)
    assert {(r["mode"], r["transport"], r["clients"], r["scenarios_per_call"]) for r in calls} >= {
        ("local", None, 2, 4), ("actor", "socket", 2, 4), ("actor", "ray", 2, 4)}
    assert all(r["scenarios_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in calls)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (5, 2), elements=st.floats(-1e3, 1e3)))
def test_operator_actions_are_learned_in_unit_range_and_scaled_into_their_box(raw):
    """An operator's module acts in [-1, 1] per component; the adapter scales it affinely onto the env's box
    (0 mid-range, +-1 the bounds, beyond clipped), batch or single; a module in the env's own space (an older
    checkpoint) is clipped as before."""
    from evgrid.agents.rllib.env import operator_module_space, to_env_action

    env = gym.spaces.Box(np.array([0.5, -1.0], np.float32), np.array([2.0, 1.0], np.float32))
    mod = operator_module_space(env)
    assert mod == gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    out = to_env_action(raw, mod, env)
    x = np.clip(raw, -1, 1)
    np.testing.assert_allclose(out, np.column_stack([1.25 + 0.75 * x[:, 0], x[:, 1]]), rtol=1e-6, atol=1e-6)
    assert all(env.contains(row) for row in out)
    np.testing.assert_allclose(to_env_action(raw[0], mod, env), out[0])
    np.testing.assert_allclose(to_env_action(raw[0], env, env), np.clip(raw[0], env.low, env.high).astype(np.float32))
    assert operator_module_space(gym.spaces.Discrete(3)) == gym.spaces.Discrete(3)


def test_operator_modules_and_the_vector_env_use_the_unit_range():
    env_config = {"config": "quickstart", "overrides": {"agents": {"station": "rule", "ev_view": "rule"}}}
    vec = RLlibEVGridVector(env_config, num_envs=1)
    spec = module_specs(vec.vec)
    unit = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert spec.rl_module_specs["operator"].action_space == unit
    assert vec.single_action_spaces["operator_0"] == unit and vec.vec.action_space("operator_0").low[0] == 0.5
    vec.reset(seed=0)
    obs, *_ = vec.step([{a: np.array([1.0], np.float32) for a in vec.vec.agents[0]}])
    top = vec.vec.action_space("operator_0").high[0]
    np.testing.assert_allclose(vec.vec.sim.prices.next, top)  # +1 -> the multiplier's ceiling, announced ahead
