"""P-DQN / MP-DQN (evgrid.agents.rllib.pdqn): learning a hybrid-action task with a known optimum, actions inside
the space, MP-DQN's independence of Q_k from the other modes' parameters, losses reaching only their own network,
settings checks, and checkpoint / restore / resume."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from ray.rllib.algorithms.algorithm import Algorithm  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # noqa: E402

from evgrid.agents.rllib.pdqn import (  # noqa: E402
    MPDQN,
    PDQN,
    Q_NEXT,
    QF_PREDS,
    MPDQNConfig,
    PDQNConfig,
    PDQNTorchRLModule,
    hybrid_action_space,
    pdqn_losses,
)

torch.set_num_threads(1)

# the toy task's parameter ranges: mode 0's in [-2, 2], mode 1's in [-1.5, 1.5]
LOW, HIGH = np.array([-2.0, -1.5]), np.array([2.0, 1.5])
EPISODE_STEPS = 4


class HybridToy(gym.Env):
    """A fresh state s ~ U[-1, 1]^2 every step, ``EPISODE_STEPS`` steps an episode.

    Mode 0 pays ``1 - 2 (x_0 - s_0)^2`` (best: x_0 = s_0, reward 1); mode 1 pays ``1 + 2 s_1 - 4 (x_1 + s_1)^2``
    (best: x_1 = -s_1, reward 1 + 2 s_1).  The optimal policy takes mode 1 iff s_1 > 0, with those parameters;
    the next state does not depend on the action, so it is optimal for every discount.  Either mode alone, even
    with perfect parameters, earns 2/3 of the optimum; a frozen actor (parameters at the range centres) about 3/4.
    Every action is checked against the space, so exploration outside the Box fails the run.
    """

    def __init__(self, config: dict | None = None) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = hybrid_action_space(LOW, HIGH)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        self.s = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        return self.s, {}

    def step(self, action):
        assert self.action_space.contains(action), f"action outside the space: {action!r}"
        r = reward(self.s, int(action["mode"]), np.asarray(action["power"], np.float64))
        self.t += 1
        self.s = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        return self.s, float(r), False, self.t >= EPISODE_STEPS, {}


def reward(s: np.ndarray, mode: np.ndarray | int, x: np.ndarray) -> np.ndarray:
    """The toy's reward for states ``[..., 2]``, modes ``[...]``, parameters ``[..., 2]``."""
    s0, s1 = s[..., 0], s[..., 1]
    return np.where(mode == 0, 1.0 - 2.0 * (x[..., 0] - s0) ** 2, 1.0 + 2.0 * s1 - 4.0 * (x[..., 1] + s1) ** 2)


def optimal_reward(s: np.ndarray) -> np.ndarray:
    return np.maximum(1.0, 1.0 + 2.0 * s[..., 1])


def random_reward(s: np.ndarray) -> np.ndarray:
    """Expected reward of a uniformly random mode with uniform parameters: E(x - c)^2 = var + (mean - c)^2."""
    var = (HIGH - LOW) ** 2 / 12.0
    mid = (HIGH + LOW) / 2.0
    s0, s1 = s[..., 0], s[..., 1]
    r0 = 1.0 - 2.0 * (var[0] + (mid[0] - s0) ** 2)
    r1 = 1.0 + 2.0 * s1 - 4.0 * (var[1] + (mid[1] + s1) ** 2)
    return 0.5 * (r0 + r1)


def greedy_returns(module, n_episodes: int = 200, first_seed: int = 10_000) -> tuple[float, float, float]:
    """Mean episode return of the module's greedy policy on freshly seeded episodes, and on the same states the
    optimal and the random policy's expected returns."""
    env = HybridToy()
    got, best, rand = [], [], []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=first_seed + i)
        done = False
        ret = opt = rnd = 0.0
        while not done:
            act = module.forward_inference({Columns.OBS: torch.from_numpy(obs[None])})[Columns.ACTIONS]
            opt += float(optimal_reward(obs))
            rnd += float(random_reward(obs))
            obs, r, term, trunc, _ = env.step({"mode": int(act["mode"][0]), "power": act["power"][0].numpy()})
            ret += r
            done = term or trunc
        got.append(ret)
        best.append(opt)
        rand.append(rnd)
    return float(np.mean(got)), float(np.mean(best)), float(np.mean(rand))


pytestmark = pytest.mark.usefixtures("ray_local")  # one embedded Ray for the module (conftest)


def toy_config(cls: type[PDQNConfig] = PDQNConfig, seed: int = 0, **training) -> PDQNConfig:
    """A small, fast setup: sampling in the driver, 16 env steps and 2 updates of 64 per iteration."""
    settings = dict(gamma=0.5, num_steps_sampled_before_learning_starts=200, epsilon=[[0, 1.0], [1500, 0.05]],
                    param_noise=[[0, 0.3], [1500, 0.05]], training_intensity=8.0, train_batch_size_per_learner=64,
                    critic_lr=1e-3, actor_lr=1e-3)
    settings.update(training)
    return (cls().environment(HybridToy)
            .env_runners(num_env_runners=0, rollout_fragment_length=16)
            .rl_module(model_config={"hidden": [64, 64]})
            .training(**settings)
            .debugging(seed=seed))


# ---- learning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, training", [
    (PDQNConfig, dict(double_q=True, tau=0.01, target_network_update_freq=0,
                      replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 20_000,
                                            "alpha": 0.6, "beta": 0.4})),
    pytest.param(MPDQNConfig, dict(double_q=False, tau=1.0, target_network_update_freq=100,
                                   replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 20_000}),
                 marks=pytest.mark.slow),  # ~34 s; the default suite keeps ~10 min
], ids=["PDQN-double-prioritised-soft", "MPDQN-hard-sync"])
def test_greedy_policy_reaches_the_optimum_of_the_toy_task(cls, training):
    # 8 updates of 64 per iteration; measured greedy / optimum over seeds 0-7: P-DQN 0.95-0.99, MP-DQN 0.99
    algo = toy_config(cls, training_intensity=32.0, **training).build_algo()
    try:
        assert isinstance(algo, MPDQN if cls is MPDQNConfig else PDQN)
        for _ in range(150):  # 2400 env steps, 1200 updates
            result = algo.train()
        module = algo.get_module()
        assert module.multi_pass is (cls is MPDQNConfig)
        got, best, rand = greedy_returns(module)
    finally:
        algo.stop()
    learners = result["learners"]["default_policy"]
    assert np.isfinite(learners["qf_loss"]) and learners["num_target_updates"] > 0
    assert got >= 0.9 * best, f"greedy return {got:.3f} < 90 % of the optimum {best:.3f} (random {rand:.3f})"
    assert got - rand > 0.8 * (best - rand), f"greedy {got:.3f} barely beats random {rand:.3f} (optimum {best:.3f})"


# ---- the module ------------------------------------------------------------------------------------------------


def _module(action_space: gym.spaces.Dict, n_obs: int = 3, **model_config) -> PDQNTorchRLModule:
    spec = RLModuleSpec(module_class=PDQNTorchRLModule,
                        observation_space=gym.spaces.Box(-1.0, 1.0, (n_obs,), np.float32),
                        action_space=action_space, model_config={"hidden": [16, 16], **model_config})
    torch.manual_seed(0)
    return spec.build()


@pytest.mark.parametrize("low, high", [
    ([0.0, -3.0, 10.0], [5.0, 1.0, 11.0]),  # one parameter per mode, uneven ranges
    ([[0.0, -1.0], [-3.0, 2.0], [7.0, 7.5]], [[1.0, 1.0], [-2.0, 4.0], [9.0, 8.0]]),  # two per mode
])
def test_actions_stay_inside_the_space(low, high):
    space = hybrid_action_space(low, high)
    lo, hi = space["power"].low, space["power"].high
    # huge observations saturate the actor's tanh; huge noise and a random branch push against every bound
    obs = torch.from_numpy(np.random.default_rng(0).normal(0.0, 100.0, (500, 3)).astype(np.float32))
    for eps, noise in ((0.0, 0.0), (0.0, 10.0), (1.0, 0.0), (0.5, 3.0)):
        module = _module(space, epsilon=eps, param_noise=noise)
        outs = [module.forward_inference({Columns.OBS: obs}), module.forward_exploration({Columns.OBS: obs}, t=0)]
        for out in outs:
            act = out[Columns.ACTIONS]
            mode, power = act["mode"].numpy(), act["power"].numpy()
            assert mode.shape == (500,) and mode.dtype == np.int64 and ((mode >= 0) & (mode < 3)).all()
            assert power.shape == (500, *lo.shape) and power.dtype == np.float32
            assert (power >= lo).all() and (power <= hi).all()
            assert all(space.contains({"mode": mode[i], "power": power[i]}) for i in range(0, 500, 25))
    # a random mode now and then comes with uniform parameters, spread over the whole range
    out = _module(space, epsilon=1.0, param_noise=0.0).forward_exploration({Columns.OBS: obs}, t=0)
    power = out[Columns.ACTIONS]["power"].numpy()
    assert np.bincount(out[Columns.ACTIONS]["mode"].numpy(), minlength=3).min() > 100
    assert (power.min(0) < lo + 0.1 * (hi - lo)).all() and (power.max(0) > hi - 0.1 * (hi - lo)).all()


def test_epsilon_and_noise_follow_their_schedules():
    space = hybrid_action_space(LOW, HIGH)
    module = _module(space, n_obs=2, epsilon=[[0, 1.0], [1000, 0.0]], param_noise=[[0, 0.5], [1000, 0.0]])
    obs = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (400, 2)).astype(np.float32))
    greedy = module.forward_inference({Columns.OBS: obs})[Columns.ACTIONS]
    late = module.forward_exploration({Columns.OBS: obs}, t=5000)[Columns.ACTIONS]
    assert torch.equal(late["mode"], greedy["mode"]) and torch.equal(late["power"], greedy["power"])
    early = module.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTIONS]
    assert (early["mode"] != greedy["mode"]).float().mean() > 0.3  # half of the random modes differ
    half = module.forward_exploration({Columns.OBS: obs}, t=500)[Columns.ACTIONS]  # epsilon 0.5, noise 0.25
    changed = (half["power"] != greedy["power"]).all(-1).float().mean()
    assert changed == 1.0


def _param_jacobian(module: PDQNTorchRLModule) -> torch.Tensor:
    """|dQ_k / dx_j| summed over a batch, ``[K (k), K (j)]``."""
    torch.manual_seed(1)
    obs = torch.rand(32, 3) * 2 - 1
    x = (torch.rand(32, module.n_mode, module.n_param) * 2 - 1).requires_grad_(True)
    q = module.q_values(obs, x)
    rows = []
    for k in range(module.n_mode):
        (g,) = torch.autograd.grad(q[:, k].sum(), x, retain_graph=True)
        rows.append(g.abs().sum(dim=(0, 2)))
    return torch.stack(rows)


def test_multi_pass_q_k_does_not_depend_on_other_modes_parameters():
    space = hybrid_action_space([0.0, -1.0, 2.0], [1.0, 1.0, 3.0])
    multi = _param_jacobian(_module(space, multi_pass=True))
    off = ~torch.eye(3, dtype=torch.bool)
    assert (multi[off] == 0).all(), f"multi-pass Q_k depends on x_j, j != k: {multi}"
    assert (multi.diagonal() > 0).all()
    single = _param_jacobian(_module(space, multi_pass=False))
    assert (single[off] > 0).all(), f"single-pass Q_k should see every x_j: {single}"


def _batch(module: PDQNTorchRLModule, n: int = 64) -> dict:
    g = torch.Generator().manual_seed(2)
    lo, hi = module._low.reshape(-1), module._high.reshape(-1)
    return {Columns.OBS: torch.rand(n, 3, generator=g) * 2 - 1,
            Columns.NEXT_OBS: torch.rand(n, 3, generator=g) * 2 - 1,
            Columns.ACTIONS: {"mode": torch.randint(0, module.n_mode, (n,), generator=g),
                              "power": lo + torch.rand(n, module.n_mode, generator=g) * (hi - lo)},
            Columns.REWARDS: torch.randn(n, generator=g), Columns.TERMINATEDS: torch.rand(n, generator=g) < 0.2}


@pytest.mark.parametrize("multi_pass", [False, True])
def test_each_loss_reaches_only_its_own_network(multi_pass):
    module = _module(hybrid_action_space([0.0, -1.0], [1.0, 1.0]), multi_pass=multi_pass)
    module.make_target_networks()
    batch = _batch(module)
    q_loss, actor_loss, td = pdqn_losses(module.forward_train(batch), batch, gamma=0.9)
    q_params, a_params = list(module.q_net.parameters()), list(module.actor.parameters())
    target_params = list(module._target_q.parameters()) + list(module._target_actor.parameters())
    assert not any(p.requires_grad for p in target_params)
    from_actor = torch.autograd.grad(actor_loss, q_params + a_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in from_actor[:len(q_params)]), "the actor loss reaches the Q-network's weights"
    assert all(g is not None and g.abs().sum() > 0 for g in from_actor[len(q_params):])
    from_q = torch.autograd.grad(q_loss, q_params + a_params, allow_unused=True)
    assert all(g is None for g in from_q[len(q_params):]), "the Q-loss reaches the actor"
    assert all(g is not None and g.abs().sum() > 0 for g in from_q[:len(q_params)])
    assert td.shape == (64,) and not td.requires_grad


def test_bootstrap_value_and_double_q():
    space = hybrid_action_space([0.0, -1.0, 0.0], [1.0, 1.0, 2.0])
    for double_q in (False, True):
        module = _module(space, double_q=double_q)
        module.make_target_networks()
        with torch.no_grad():  # targets different from the online networks
            for p in list(module._target_q.parameters()) + list(module._target_actor.parameters()):
                p.add_(0.3 * torch.randn_like(p))
        batch = _batch(module)
        nxt = batch[Columns.NEXT_OBS]
        with torch.no_grad():
            q_target = module.q_values(nxt, module.params_unit(nxt, module._target_actor), module._target_q)
            online = module.q_values(nxt, module.params_unit(nxt)).argmax(-1, keepdim=True)
        want = q_target.gather(-1, online).squeeze(-1) if double_q else q_target.max(-1).values
        out = module.forward_train(batch)
        assert torch.allclose(out[Q_NEXT], want) and out[QF_PREDS].shape == (64, 3)
        stored = module.q_values(batch[Columns.OBS], module.to_unit(batch[Columns.ACTIONS]["power"]))
        assert torch.allclose(out[QF_PREDS], stored)


@pytest.mark.parametrize("frozen", ["critic_lr", "actor_lr"])
def test_two_optimisers_step_only_their_network(frozen):
    """A zero learning rate freezes exactly one network; the other learns, and the targets follow."""
    algo = toy_config(**{frozen: 0.0, "num_steps_sampled_before_learning_starts": 32, "tau": 0.5}).build_algo()
    try:
        module = algo.learner_group._learner.module["default_policy"]
        before = {n: {k: v.clone() for k, v in net.state_dict().items()}
                  for n, net in (("q", module.q_net), ("actor", module.actor), ("target_q", module._target_q))}
        for _ in range(4):
            result = algo.train()
        assert result["learners"]["default_policy"]["num_target_updates"] > 0
        changed = {n: any(not torch.equal(before[n][k], v) for k, v in net.state_dict().items())
                   for n, net in (("q", module.q_net), ("actor", module.actor), ("target_q", module._target_q))}
    finally:
        algo.stop()
    assert changed == {"q": frozen != "critic_lr", "actor": frozen != "actor_lr", "target_q": frozen != "critic_lr"}


# ---- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("tau", 0.0), ("actor_lr", -1e-3), ("critic_lr", 2.0), ("epsilon", 1.5), ("epsilon", [[100, 1.0], [200, 0.1]]),
    ("param_noise", [[0, 0.3], [0, 0.1]]), ("multi_pass", "yes"), ("double_q", 1), ("td_error_loss_fn", "l1"),
    ("n_step", 0), ("training_intensity", 0.0), ("target_network_update_freq", -1),
    ("num_steps_sampled_before_learning_starts", 1.5),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        PDQNConfig().training(**{field: value}).validate()


def test_bad_buffer_action_normalisation_and_spaces_are_refused():
    with pytest.raises(ValueError, match="^replay_buffer_config: expected a mapping with a 'type'"):
        PDQNConfig().training(replay_buffer_config=5).validate()
    with pytest.raises(ValueError, match="^replay_buffer_config.type: expected an episode replay buffer"):
        PDQNConfig().training(replay_buffer_config={"type": "MultiAgentReplayBuffer"}).validate()
    with pytest.raises(ValueError, match="^normalize_actions: expected False"):
        PDQNConfig().environment(normalize_actions=True).validate()
    PDQNConfig().validate()
    assert MPDQNConfig().multi_pass and MPDQNConfig().algo_class is MPDQN and PDQNConfig().algo_class is PDQN
    with pytest.raises(ValueError, match="^action_space: PDQN expects Dict"):
        _module(gym.spaces.Box(-1.0, 1.0, (3,), np.float32))
    with pytest.raises(ValueError, match=r"^action_space.power: expected shape \(2,\) or \(2, P\)"):
        _module(gym.spaces.Dict({"mode": gym.spaces.Discrete(2), "power": gym.spaces.Box(0.0, 1.0, (3,))}))
    with pytest.raises(ValueError, match="^action_space.power: expected finite bounds"):
        _module(gym.spaces.Dict({"mode": gym.spaces.Discrete(2), "power": gym.spaces.Box(0.0, np.inf, (2,))}))
    with pytest.raises(ValueError, match=r"^model_config.q_hidden: expected a list of layer widths"):
        _module(hybrid_action_space([0.0, 0.0], [1.0, 1.0]), q_hidden=[])


# ---- checkpoints -----------------------------------------------------------------------------------------------


def test_checkpoint_restores_greedy_actions_and_training_resumes(tmp_path):
    algo = toy_config(MPDQNConfig, num_steps_sampled_before_learning_starts=32).build_algo()
    obs = torch.from_numpy(np.random.default_rng(3).uniform(-1, 1, (256, 2)).astype(np.float32))
    try:
        for _ in range(6):
            algo.train()
        want = algo.get_module().forward_inference({Columns.OBS: obs})[Columns.ACTIONS]
        learner_state = algo.learner_group._learner.module["default_policy"].get_state()
        algo.save_to_path(str(tmp_path))
    finally:
        algo.stop()
    restored = Algorithm.from_checkpoint(str(tmp_path))
    try:
        assert isinstance(restored, MPDQN) and restored.config.multi_pass
        got = restored.get_module().forward_inference({Columns.OBS: obs})[Columns.ACTIONS]
        assert torch.equal(got["mode"], want["mode"]) and torch.equal(got["power"], want["power"])
        state = restored.learner_group._learner.module["default_policy"].get_state()
        assert set(state) == set(learner_state) and any(k.startswith("_target_q") for k in state)
        assert all(np.array_equal(state[k], learner_state[k]) for k in state)  # targets and online networks
        results = [restored.train() for _ in range(3)]
    finally:
        restored.stop()
    assert results[-1]["training_iteration"] == 9
    assert results[-1]["num_env_steps_sampled_lifetime"] == 9 * 16
    # the buffer is not in the checkpoint: learning resumes once it holds 32 steps again
    assert "learners" in results[-1] and np.isfinite(results[-1]["learners"]["default_policy"]["qf_loss"])
