"""Trained policies from a checkpoint, acting on an EVGridEnv (greedy: the distributions' modes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModule

from evgrid.agents.rllib.env import clip_action
from evgrid.agents.rllib.modules import module_of


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a run directory (its last checkpoint)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        ckpts = sorted((p / "checkpoints").glob("iter_*"))
        if not ckpts:
            raise FileNotFoundError(f"checkpoint: run directory {os.fspath(p)!r} holds no checkpoint yet")
        p = ckpts[-1]
    if not (p / "learner_group" / "learner" / "rl_module").is_dir():
        raise FileNotFoundError(f"checkpoint: {os.fspath(p)!r} is not an RLlib algorithm checkpoint")
    return p


class TrainedPolicy:
    """Acts for every learned agent with the modules of a checkpoint."""

    def __init__(self, checkpoint: str | os.PathLike[str], env: Any) -> None:
        path = checkpoint_dir(checkpoint) / "learner_group" / "learner" / "rl_module"
        self.modules: MultiRLModule = MultiRLModule.from_checkpoint(str(path.resolve()))
        self.env = env

    @torch.no_grad()
    def act(self, obs: dict[str, Any]) -> dict[str, Any]:
        by_module: dict[str, list[str]] = {}
        for agent in obs:
            if agent in self.env.agents:
                by_module.setdefault(module_of(agent), []).append(agent)
        out: dict[str, Any] = {}
        for mid, agents in by_module.items():
            module = self.modules[mid]
            batch = _stack([obs[a] for a in agents])
            fwd = module.forward_inference({Columns.OBS: batch})
            dist = module.get_inference_action_dist_cls().from_logits(fwd[Columns.ACTION_DIST_INPUTS])
            actions = _to_numpy(dist.to_deterministic().sample())
            for i, a in enumerate(agents):
                out[a] = clip_action(_index(actions, i), self.env.action_space(a))
        return out


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
