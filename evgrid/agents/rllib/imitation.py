"""Imitation of the perfect-foresight oracle: a warm start for grouped EVs (``train.imitation_days``).

A few minutes of PPO from a random network leaves the quickstart's EVs well short of the plain TOU rule (see
the README's demo).  The oracle (:mod:`evgrid.agents.oracle`) knows each day's best schedule; behaviour
cloning fits the grouped EVs' module (:class:`evgrid.agents.rllib.modules.SlotSetModule`) to its actions from
what the EVs observe (their own features and their station's context: no foresight), on demonstration days
apart from the evaluation days, and PPO or IMPALA then fine-tunes it on the env's rewards.  The value head is
fitted alongside to the demonstrations' discounted returns, so the fine-tuning's first advantages measure the
policy, not an untrained critic.

Demonstrations come from the oracle's own setting, operators on the TOU tariff and stations at their full
allowance (what its plan assumes), whatever the training config's operators and stations do; stationary
storage follows its rule there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from ray.rllib.core.columns import Columns

from evgrid.agents import oracle
from evgrid.envs.config import EnvConfig, load_config
from evgrid.envs.sim import Sim
from evgrid.envs.state import IDLE

if TYPE_CHECKING:
    from evgrid.agents.rllib.algos import TrainConfig

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class Demonstrations:
    """The oracle's days in the grouped view, one row per station and step: the station's observation (``evs``
    (N, S, F), ``mask`` (N, S), ``context`` (N, C)), each slot's planned ``mode`` (N, S) and ``power`` fraction
    (N, S) (empty slots hold idle and 0.5) and the station agent's discounted ``ret`` (N,) from that step to the
    day's end."""

    evs: FloatArray
    mask: FloatArray
    context: FloatArray
    mode: npt.NDArray[np.int64]
    power: FloatArray
    ret: FloatArray
    days: int
    wall_s: float

    @property
    def slot_steps(self) -> int:
        """Decisions demonstrated: occupied slots summed over the rows."""
        return int(self.mask.sum())


def oracle_demonstrations(cfg: EnvConfig, seeds: Iterable[int], gamma: float,
                          progress: bool = False) -> Demonstrations:
    """Plan each seed's day with the oracle and replay the plan through the grouped view, recording what each
    station's EVs observed, what the plan had them do and the returns (discount ``gamma``) it earned."""
    from tqdm import tqdm

    from evgrid.envs.ev_grid import EVGridEnv

    t0 = time.perf_counter()
    cfg = load_config(cfg, {"agents": {"operator": "rule", "station": "rule", "ev_view": "grouped",
                                       "ev_shield": "none"}, "log_dir": None})
    env = EVGridEnv(cfg)
    planner = Sim(oracle.oracle_config(cfg), 1)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("evs", "mask", "context", "mode", "power", "ret")}
    seeds = list(seeds)
    for seed in tqdm(seeds, desc="imitate: oracle days", unit="day", disable=not progress):
        plan = oracle.plan_day(planner, seed)
        obs, _ = env.reset(seed=seed)
        rewards = []  # (stations,) per step
        while env.agents:
            act = oracle.actions(plan, env.sim)
            owner = env.vec.slots.owner  # (stations, slots): the session in each slot, -1 where empty
            occupied = owner >= 0
            mode = np.where(occupied, act.ev_mode[np.maximum(owner, 0)], IDLE)
            power = np.where(occupied, act.ev_power[np.maximum(owner, 0)], 0.5).astype(np.float32)
            actions = {}
            for agent in env.agents:  # evs_0, evs_1, ...: the stations in order
                j = int(agent.removeprefix("evs_"))
                actions[agent] = {"mode": mode[j], "power": power[j]}
                o = obs[agent]
                for key, value in (("evs", o["evs"]), ("mask", o["mask"]), ("context", o["context"]),
                                   ("mode", mode[j]), ("power", power[j])):
                    rows[key].append(value)
            obs, rew, *_ = env.step(actions)
            rewards.append([rew[a] for a in actions])
        rows["ret"].extend(_discounted(np.asarray(rewards, dtype=np.float32), gamma).ravel())
    env.close()
    demos = Demonstrations(**{k: np.stack(v) for k, v in rows.items()}, days=len(seeds),
                           wall_s=time.perf_counter() - t0)
    if demos.slot_steps == 0:
        raise ValueError(f"seeds: no EV plugged in on the {len(seeds)} demonstration days")
    return demos


def _discounted(rewards: FloatArray, gamma: float) -> FloatArray:
    """(T, M) rewards -> (T, M) returns to the end, discount ``gamma``."""
    out = np.empty_like(rewards)
    acc = np.zeros(rewards.shape[1], dtype=rewards.dtype)
    for t in range(rewards.shape[0] - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


def clone(module: torch.nn.Module, demos: Demonstrations, *, epochs: int, lr: float, seed: int,
          minibatch: int = 256, progress: bool = False) -> list[tuple[float, float]]:
    """Fit ``module`` (a :class:`SlotSetModule`) to ``demos`` with Adam: its policy by the negative
    log-likelihood per occupied slot of the demonstrated mode and, where it charges or discharges, its power;
    its value by the squared error from the returns, per unit of their variance (fitted to the standardised
    returns, then the output layer is rescaled: returns of a few hundred are out of reach of a fresh head's
    steps), its gradient stopping at the per-EV trunk, which the policy alone shapes (through the trunk, the
    value's error cost the demo's cloned policy 0.02 per kWh).  Returns each epoch's mean policy and value
    losses, ``[(policy, value), ...]``."""
    from tqdm import tqdm

    from evgrid.agents.rllib.modules import SlotDistribution

    data = {k: torch.as_tensor(getattr(demos, k)) for k in ("evs", "mask", "context", "mode", "power", "ret")}
    active = (data["mode"] != IDLE).float()  # an idle slot's power is not acted on: nothing to imitate
    mu, sigma = data["ret"].mean(), data["ret"].std().clamp(min=1e-3)
    target = (data["ret"] - mu) / sigma
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, losses = data["mask"].shape[0], []
    for _ in tqdm(range(epochs), desc="imitate: cloning", unit="epoch", disable=not progress):
        pi_total = vf_total = 0.0
        for b in torch.randperm(n, generator=gen).split(minibatch):
            batch = {Columns.OBS: {k: data[k][b] for k in ("evs", "mask", "context")}}
            out = module.forward_train(batch)
            d = SlotDistribution(out[Columns.ACTION_DIST_INPUTS])
            logp = d.mode_logp(data["mode"][b]) + d.power_logp(data["power"][b]) * active[b]
            pi_sum = -(logp * d.mask).sum()
            vf_sum = ((module.compute_values(batch, out[Columns.EMBEDDINGS].detach()) - target[b]) ** 2).sum()
            loss = pi_sum / d.mask.sum().clamp(min=1.0) + vf_sum / b.numel()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pi_total += float(pi_sum.detach())
            vf_total += float(vf_sum.detach())
        losses.append((pi_total / demos.slot_steps, vf_total / n))
    with torch.no_grad():  # standardised -> raw returns
        head = module.vf_net[-1]
        head.weight.mul_(sigma)
        head.bias.mul_(sigma).add_(mu)
    return losses


def imitate(module: torch.nn.Module, env: EnvConfig, train: TrainConfig, progress: bool = False) -> dict:
    """Clone the oracle into ``module`` on ``train.imitation_days`` days from ``train.imitation_seed``
    (:class:`evgrid.agents.rllib.algos.TrainConfig`); returns what was done, for ``imitation.json``."""
    seeds = range(train.imitation_seed, train.imitation_seed + train.imitation_days)
    demos = oracle_demonstrations(env, seeds, train.gamma, progress)
    t0 = time.perf_counter()
    losses = clone(module, demos, epochs=train.imitation_epochs, lr=train.imitation_lr, seed=train.seed,
                   progress=progress)
    report = {"days": demos.days, "first_seed": train.imitation_seed, "rows": int(demos.mask.shape[0]),
              "slot_steps": demos.slot_steps, "epochs": train.imitation_epochs, "lr": train.imitation_lr,
              "policy_loss_per_epoch": [p for p, _ in losses], "value_loss_per_epoch": [v for _, v in losses],
              "demonstrations_s": demos.wall_s, "cloning_s": time.perf_counter() - t0}
    log.info("imitation: %d oracle days (%d EV decisions) in %.1f s; cloning in %.1f s, policy loss %.3f -> %.3f, "
             "value loss %.3f -> %.3f", demos.days, demos.slot_steps, demos.wall_s, report["cloning_s"],
             losses[0][0], losses[-1][0], losses[0][1], losses[-1][1])
    return report
