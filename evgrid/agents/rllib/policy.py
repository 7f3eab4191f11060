"""Trained policies acting on an EVGridEnv, greedily: from a checkpoint, or from a live experiment's modules."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule

from evgrid.agents.rllib.env import to_env_action
from evgrid.agents.rllib.modules import module_of
from evgrid.agents.rllib.pdqn import PDQNTorchRLModule, chosen_mode_action
from evgrid.config import ConfigError


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a run directory (its last checkpoint); a ConfigError naming ``checkpoint``
    otherwise."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        ckpts = sorted((p / "checkpoints").glob("iter_*"))
        if not ckpts:
            raise ConfigError(f"checkpoint: run directory {os.fspath(p)!r} holds no checkpoint yet")
        p = ckpts[-1]
    if not (p / "learner_group" / "learner" / "rl_module").is_dir():
        raise ConfigError(f"checkpoint: expected an RLlib algorithm checkpoint or a run directory holding one, "
                          f"got {os.fspath(path)!r}")
    return p


def load_modules(checkpoint: str | os.PathLike[str]) -> MultiRLModule:
    """The trained modules of a checkpoint (or of a run directory's last one)."""
    path = checkpoint_dir(checkpoint) / "learner_group" / "learner" / "rl_module"
    return MultiRLModule.from_checkpoint(str(path.resolve()))


class TrainedPolicy:
    """Acts for every learned agent of ``env`` with ``modules``, greedily (the distributions' modes; DQN: the
    best Q-value; P-DQN: the best mode and its power, as in training)."""

    def __init__(self, modules: MultiRLModule, env: Any) -> None:
        self.modules = modules
        self.env = env

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike[str], env: Any) -> TrainedPolicy:
        return cls(load_modules(checkpoint), env)

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> dict[str, Any]:
        by_module: dict[str, list[str]] = {}
        for agent in obs:
            if agent in self.env.agents:
                by_module.setdefault(module_of(agent), []).append(agent)
        out: dict[str, Any] = {}
        for mid, agents in by_module.items():
            module = self.modules[mid]
            actions = _to_numpy(_greedy(module, _stack([obs[a] for a in agents])))
            # a P-DQN module gives every mode's power (per slot, grouped); the env takes the chosen mode's
            # (ChosenModeParameter)
            hybrid = isinstance(module.unwrapped(), PDQNTorchRLModule)
            for i, a in enumerate(agents):
                action = _index(actions, i)
                out[a] = to_env_action(chosen_mode_action(action) if hybrid else action, module.action_space,
                                       self.env.action_space(a))
        return out


def _greedy(module: Any, batch: Any) -> Any:
    """The module's greedy actions for a batch of observations."""
    fwd = module.forward_inference({Columns.OBS: batch})
    if Columns.ACTIONS in fwd:  # value-based modules (DQN, P-DQN) pick their actions in forward_inference
        return fwd[Columns.ACTIONS]
    dist = module.get_inference_action_dist_cls().from_logits(fwd[Columns.ACTION_DIST_INPUTS])
    return dist.to_deterministic().sample()


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], dict):
        return {k: _stack([x[k] for x in items]) for k in items[0]}
    return torch.as_tensor(np.stack(items))


def _to_numpy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_numpy(v) for k, v in x.items()}
    return x.cpu().numpy()


def _index(x: Any, i: int) -> Any:
    if isinstance(x, dict):
        return {k: _index(v, i) for k, v in x.items()}
    return x[i]


class FrozenOperatorPolicy:
    """A trained operator module as an :class:`evgrid.envs.ev_grid.OperatorPolicy`: greedy actions for a batch
    of operator observations, scaled from the module's [-1, 1] into ``action_space`` (the env's) as in training.
    Picklable, so RLlib ships it to its env runners, where it acts inside every env."""

    def __init__(self, module: Any, action_space: Any) -> None:
        self.module = module.unwrapped() if hasattr(module, "unwrapped") else module
        self.action_space = action_space

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        actions = _to_numpy(_greedy(self.module, torch.as_tensor(np.asarray(obs, dtype=np.float32))))
        space = self.action_space
        if hasattr(space, "low"):  # Box: one row per operator, scaled from the module's [-1, 1]
            return to_env_action(actions, self.module.action_space, space)
        return actions.astype(np.int64)
