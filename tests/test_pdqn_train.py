"""P-DQN / MP-DQN in `evgrid train`: individual EVs learn (operators and stations on their rules), the env is
sent the chosen mode's power while the episodes keep all three, checkpoint -> evaluate -> resume, and the
configurations P-DQN cannot train are refused before Ray starts."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from ray.rllib.core.columns import Columns

from evgrid.agents.rllib.algos import TrainConfig, load_run_config
from evgrid.agents.rllib.experiment import Experiment
from evgrid.agents.rllib.pdqn import ChosenModeParameter, PDQNTorchRLModule

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# 10 EVs from 16:00: some steps have no EV plugged in (they run inside the env's step), and with two
# environments per runner one of them sometimes has no agent while the other has
ENV = ["n_steps=24", "start_hour=16.0", "fleet.n_ev=10", "stations.ports=40", "agents.ev_view=individual",
       "agents.operator=rule", "agents.station=rule"]
TRAIN = ["train.num_env_runners=0", "train.envs_per_runner=2", "train.rollout_fragment_length=24",
         "train.train_batch_size=32", "train.minibatch_size=32", "train.learning_starts=24",
         "train.training_intensity=2.0", "train.hidden=[32, 32]", "train.checkpoint_every=1"]


@pytest.mark.parametrize("algorithm", ["PDQN", "MPDQN"])
def test_pdqn_trains_individual_evs_checkpoints_evaluates_and_resumes(tmp_path, ray_local, algorithm):
    from evgrid.agents.rllib.policy import TrainedPolicy, load_modules
    from evgrid.cli import main
    from evgrid.envs.ev_grid import EVGridEnv

    run = tmp_path / "run"
    assert main(["train", "quickstart", *ENV, *TRAIN, f"train.algorithm={algorithm}", "train.iterations=2",
                 "--run-dir", str(run)]) == 0
    m = pd.read_parquet(run / "metrics.parquet")
    assert sorted(m.iteration) == [1, 2] and set(m.module) == {"ev"}
    assert np.isfinite(m.return_mean).all() and (m.ev_decisions > 0).all()
    assert (m.learn_s > 0).all(), "no learner update ran"
    # greedy actions from the checkpoint: inside the env's space, the chosen mode's power
    modules = load_modules(run)
    assert isinstance(modules["ev"].unwrapped(), PDQNTorchRLModule)
    assert modules["ev"].unwrapped().multi_pass is (algorithm == "MPDQN")
    env_cfg, _ = load_run_config("quickstart", ENV)
    env = EVGridEnv(env_cfg)
    obs, _ = env.reset(seed=1)
    acts = TrainedPolicy(modules, env).act(obs)
    agents = list(env.agents)
    full = modules["ev"].forward_inference({Columns.OBS: torch.as_tensor(np.stack([obs[a] for a in agents]))})
    full = full[Columns.ACTIONS]
    assert full["power"].shape == (len(agents), 3)
    for i, a in enumerate(agents):
        assert env.action_space(a).contains(acts[a])
        assert int(acts[a]["mode"]) == int(full["mode"][i])
        assert acts[a]["power"].tolist() == pytest.approx([float(full["power"][i, int(full["mode"][i])])])
    env.step(acts)
    evaluates_and_resumes(run, ENV, tmp_path)


def test_env_gets_the_chosen_modes_power_and_the_episode_keeps_all_three(ray_local):
    """The module-to-env piece sits where RLlib's pipeline holds one numpy action per agent: the env receives
    the chosen mode's power, the episodes store (and the Q-loss reads) every mode's."""
    env_cfg, train_cfg = load_run_config("quickstart", [*ENV, *TRAIN, "train.algorithm=PDQN"])
    with Experiment(env_cfg, train_cfg) as exp:
        runner = exp.algo.env_runner
        pipeline = runner._module_to_env
        assert [type(p).__name__ for p in pipeline.connectors][-3:] == [
            "ChosenModeParameter", "NormalizeAndClipActions", "ListifyDataForVectorEnv"]
        outputs, sent = [], []

        def recorded_pipeline(**kwargs):
            out = pipeline(**kwargs)
            outputs.append((out[Columns.ACTIONS], out[Columns.ACTIONS_FOR_ENV]))  # per env: agent -> action
            return out

        def recorded_step(actions, step=runner.env.step):
            sent.extend(a for acts in actions for a in acts.items())
            return step(actions)

        runner._module_to_env, runner.env.step = recorded_pipeline, recorded_step
        episodes = runner.sample(num_timesteps=48, random_actions=False)
        # the live modules evaluate greedily, as a checkpoint's do
        rows = exp.evaluate(episodes=1, seed=3)
    assert len(rows) == 1 and np.isfinite(rows[0]["operator_cost"])
    chosen = []
    for full, for_env in outputs:
        for e, acts in enumerate(full):
            assert acts.keys() == for_env[e].keys()
            for agent, a in acts.items():
                mode, power = int(a["mode"]), a["power"]
                assert power.shape == (3,) and int(for_env[e][agent]["mode"]) == mode
                assert for_env[e][agent]["power"].tolist() == [power[mode]]
                chosen.append((agent, mode, float(power[mode])))
    # exactly those went to the env (its adapter clips Box actions, which changes nothing inside the Box)
    assert sorted(chosen) == sorted((a, int(x["mode"]), float(x["power"][0])) for a, x in sent)
    assert len({mode for _, mode, _ in chosen}) == 3  # exploration tries every mode
    stored = [p for ep in episodes for sa in ep.agent_episodes.values() for p in sa.get_actions()["power"]]
    assert stored and all(p.shape == (3,) for p in stored)


def test_chosen_mode_piece_passes_other_modules_actions_through():
    import gymnasium as gym
    from ray.rllib.algorithms.ppo.ppo_catalog import PPOCatalog
    from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from evgrid.agents.rllib.pdqn import hybrid_action_space

    obs = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    modules = MultiRLModuleSpec(rl_module_specs={
        "ev": RLModuleSpec(module_class=PDQNTorchRLModule, observation_space=obs,
                           action_space=hybrid_action_space([0, 0, 0], [1, 1, 1]), model_config={"hidden": [4]}),
        "operator": RLModuleSpec(module_class=DefaultPPOTorchRLModule, catalog_class=PPOCatalog,
                                 observation_space=obs, action_space=gym.spaces.Discrete(3),
                                 model_config={"fcnet_hiddens": [4]})}).build()
    power = np.array([0.1, 0.2, 0.3], np.float32)
    batch = {Columns.ACTIONS: {("e", "ev_0", "ev"): [{"mode": np.int64(2), "power": power}],
                               ("e", "ev_1", "ev"): [{"mode": np.int64(0), "power": power}],
                               ("e", "operator_0", "operator"): [np.int64(1)]}}
    out = ChosenModeParameter()(rl_module=modules, batch=batch, episodes=[])
    for_env = out[Columns.ACTIONS_FOR_ENV]
    assert int(for_env[("e", "ev_0", "ev")][0]["mode"]) == 2
    assert for_env[("e", "ev_0", "ev")][0]["power"].tolist() == pytest.approx([0.3])
    assert for_env[("e", "ev_1", "ev")][0]["power"].tolist() == pytest.approx([0.1])
    assert for_env[("e", "operator_0", "operator")] == [1]
    assert out[Columns.ACTIONS][("e", "ev_0", "ev")][0]["power"] is power  # what the episode stores: untouched


@pytest.mark.parametrize("overrides,found", [
    (["agents.operator=learned"], "agents.operator is learned"),
    (["agents.ev_view=grouped", "agents.operator=learned"], "agents.operator is learned"),
    (["agents.ev_view=rule", "agents.station=learned"], "agents.station is learned"),
])
def test_levels_pdqn_cannot_learn_are_refused_before_ray_starts(tmp_path, monkeypatch, overrides, found):
    from evgrid.cluster import runtime
    from evgrid.config import ConfigError

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started for a run that cannot work"))
    for algorithm in ("PDQN", "MPDQN"):
        with pytest.raises(ConfigError, match=rf"^train\.algorithm: {algorithm} trains EVs only .*"
                                              rf"but {found}; use PPO or IMPALA"):
            runtime.train("quickstart", [*ENV, *overrides, f"train.algorithm={algorithm}"],
                          run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,expected", [
    ("actor_lr", 1.5, r"\[0.0, 1.0\]"), ("tau", 0.0, r"\(0.0, 1.0\]"), ("exploration_steps", 0, r"\[1, "),
    ("epsilon_final", -0.1, r"\[0.0, 1.0\]"), ("param_noise", 11.0, r"\[0.0, 10.0\]"),
    ("param_noise_final", -1.0, r"\[0.0, 10.0\]"), ("learning_starts", -1, r"\[0, "),
    ("training_intensity", 0.0, r"\(0.0, 1000000.0\]"), ("replay_capacity", 0, r"\[1, "),
])
def test_bad_pdqn_settings_name_the_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"^{field}: expected .*{expected}"):
        TrainConfig(algorithm="PDQN", **{field: value})
    with pytest.raises(ValueError, match=rf"^train\.{field}: expected"):
        load_run_config("quickstart", [f"train.{field}={value}"])


def evaluates_and_resumes(run, env_overrides: list[str], tmp_path) -> None:
    """The run of two iterations in ``run`` evaluates beside a rule on ``env_overrides`` and resumes to three."""
    from evgrid.cli import main

    assert main(["evaluate", "quickstart", *env_overrides, "--checkpoint", str(run), "--policy", "uncontrolled",
                 "--episodes", "1", "--out", str(tmp_path / "eval")]) == 0
    ev = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    assert list(ev.policy) == ["trained", "uncontrolled"] and np.isfinite(ev.operator_cost).all()
    # resuming continues from the last checkpoint
    assert main(["train", "train.iterations=3", "--resume", str(run)]) == 0
    m = pd.read_parquet(run / "metrics.parquet")
    assert sorted(m.iteration) == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000001", "iter_000002", "iter_000003"]
