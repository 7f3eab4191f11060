"""Imitation of the perfect-foresight oracle: a warm start for grouped EVs (``train.imitation_days``).

A few minutes of PPO from a random network leaves the quickstart's EVs well short of the plain TOU rule (see
the README's demo).  The oracle (:mod:`evgrid.agents.oracle`) knows each day's best schedule; behaviour
cloning fits the grouped EVs' module (:class:`evgrid.agents.rllib.modules.SlotSetModule`) to its actions from
what the EVs observe (their own features and their station's context: no foresight), on demonstration days
apart from the evaluation days, and PPO or IMPALA then fine-tunes it on the env's rewards.  The value head is
fitted alongside to the demonstrations' discounted returns, so the fine-tuning's first advantages measure the
policy, not an untrained critic.

Grouped P-DQN EVs (:class:`evgrid.agents.rllib.pdqn.GroupedPDQNTorchRLModule`) learn from the same
demonstrations as DQfD does (Hester et al. 2018): :func:`clone_pdqn` pre-trains the Q-network (a large margin for
the demonstrated mode, each station's Q fitted to the returns) and the power actor, and the learner keeps the
margin and power terms in its updates (:meth:`evgrid.agents.rllib.pdqn.PDQNTorchLearner.set_demonstrations`).

Demonstrations come from the oracle's own setting, operators on the TOU tariff and stations at their full
allowance (what its plan assumes), whatever the training config's operators and stations do; stationary
storage follows its rule there.  Operators that act by a fixed policy (seed 000's second stage) price the
replayed days by it instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


def oracle_demonstrations(cfg: EnvConfig, seeds: Iterable[int], gamma: float, progress: bool = False,
                          operator_policy: Any = None) -> Demonstrations:
    """Plan each seed's day with the oracle and replay the plan through the grouped view, recording what each
    station's EVs observed, what the plan had them do and the returns (discount ``gamma``) it earned.  With an
    ``operator_policy`` (:class:`evgrid.envs.ev_grid.OperatorPolicy`) the operators price by it during the
    replay, as they will while the EVs learn, instead of the TOU tariff (the plan is the oracle's all the same)."""
    from tqdm import tqdm

    from evgrid.envs.ev_grid import EVGridEnv

    t0 = time.perf_counter()
    cfg = load_config(cfg, {"agents": {"operator": "rule" if operator_policy is None else "learned",
                                       "station": "rule", "ev_view": "grouped", "ev_shield": "none"},
                            "log_dir": None})
    env = EVGridEnv(cfg, operator_policy=operator_policy)
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


def decisions(module: torch.nn.Module, demos: Demonstrations) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """The demonstrated decisions for a :class:`evgrid.agents.rllib.pdqn.GroupedPDQNTorchRLModule`, one per
    occupied slot: (its input ``[N, F + C]``, mode ``[N]``, power in the module's unit scale ``[N, 1]``, NaN where
    the EV idles, the row of ``demos`` it came from ``[N]``)."""
    obs = {k: torch.as_tensor(getattr(demos, k)) for k in ("evs", "mask", "context")}
    with torch.no_grad():
        items, idx, _ = module.slot_items(obs)
        mode = torch.as_tensor(demos.mode).reshape(-1)[idx]
        power = torch.as_tensor(demos.power).reshape(-1)[idx]
        # the planned power read as every mode's, then the planned mode's taken: the module's own scaling
        unit = module.to_unit(power.unsqueeze(-1).expand(-1, module.n_mode))[torch.arange(len(mode)), mode]
        unit = torch.where((mode != IDLE).unsqueeze(-1), unit, torch.nan)
    return items, mode, unit, idx // module.n_slot


def clone_pdqn(module: torch.nn.Module, demos: Demonstrations, *, epochs: int, lr: float, seed: int, margin: float,
               minibatch: int = 256, progress: bool = False) -> tuple[list[tuple[float, float, float]], float]:
    """Pre-train a :class:`evgrid.agents.rllib.pdqn.GroupedPDQNTorchRLModule` on ``demos`` with Adam, as DQfD
    does before it acts: the Q-network by :func:`evgrid.agents.rllib.pdqn.demonstration_losses`' margin loss
    (``margin`` in reward units) and by the squared error of each station's Q (the sum of its slots'
    demonstrated-mode values, the module's value decomposition) from the demonstrations' returns, the actor by
    the squared error from the demonstrated powers.  The values are fitted in units of the returns' root mean
    square ``scale`` and the Q-network's output layer is then multiplied by it (returns of a few hundred are out
    of reach of a fresh head's steps).  Returns ``([(margin, actor, value) loss per epoch], scale)``."""
    from tqdm import tqdm

    from evgrid.agents.rllib.pdqn import demonstration_losses

    items, mode, unit, row = decisions(module, demos)
    ret = torch.as_tensor(demos.ret)
    scale = float(ret.pow(2).mean().sqrt().clamp(min=1e-3))
    target = ret / scale
    params = [*module.actor.parameters(), *module.q_net.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(epochs), desc="imitate: pre-training", unit="epoch", disable=not progress):
        total = np.zeros(3)
        for b in torch.randperm(len(ret), generator=gen).split(minibatch):
            local = torch.full((len(ret),), -1).index_copy(0, b, torch.arange(len(b)))[row]  # row -> batch place
            pick = local >= 0
            m_loss, a_loss, q = demonstration_losses(module, items[pick], mode[pick], unit[pick], margin / scale)
            q_row = q.new_zeros(len(b)).index_add(0, local[pick], q)
            v_loss = ((q_row - target[b]) ** 2).mean()
            opt.zero_grad()
            (m_loss + a_loss + v_loss).backward()
            opt.step()
            total += [float(x.detach()) * len(b) for x in (m_loss, a_loss, v_loss)]
        losses.append(tuple(float(x) for x in total / len(ret)))
    with torch.no_grad():  # values in units of `scale` -> reward units
        head = module.q_net[-1]
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return losses, scale


def imitate(module: torch.nn.Module, demos: Demonstrations, train: TrainConfig, progress: bool = False) -> dict:
    """Fit ``module`` to ``demos`` per ``train`` (:class:`evgrid.agents.rllib.algos.TrainConfig`): behaviour
    cloning (:func:`clone`) for a :class:`SlotSetModule`, pre-training (:func:`clone_pdqn`) for a grouped P-DQN
    module; returns what was done, for ``imitation.json``."""
    from evgrid.agents.rllib.pdqn import GroupedPDQNTorchRLModule

    t0 = time.perf_counter()
    report = {"days": demos.days, "first_seed": train.imitation_seed, "rows": int(demos.mask.shape[0]),
              "slot_steps": demos.slot_steps, "epochs": train.imitation_epochs, "lr": train.imitation_lr,
              "demonstrations_s": demos.wall_s}
    if isinstance(module, GroupedPDQNTorchRLModule):
        losses, scale = clone_pdqn(module, demos, epochs=train.imitation_epochs, lr=train.imitation_lr,
                                   seed=train.seed, margin=train.imitation_margin, progress=progress)
        per_epoch = dict(zip(("margin_loss_per_epoch", "actor_loss_per_epoch", "value_loss_per_epoch"),
                             (list(x) for x in zip(*losses))))
        report |= {"margin": train.imitation_margin, "return_scale": scale, **per_epoch}
    else:
        losses = clone(module, demos, epochs=train.imitation_epochs, lr=train.imitation_lr, seed=train.seed,
                       progress=progress)
        report |= {"policy_loss_per_epoch": [p for p, _ in losses], "value_loss_per_epoch": [v for _, v in losses]}
    report["cloning_s"] = time.perf_counter() - t0
    log.info("imitation: %d oracle days (%d EV decisions) in %.1f s, fitted in %.1f s; losses per epoch, first %s, "
             "last %s", demos.days, demos.slot_steps, demos.wall_s, report["cloning_s"],
             np.round(losses[0], 3).tolist(), np.round(losses[-1], 3).tolist())
    return report
