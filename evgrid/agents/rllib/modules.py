"""RLModules and policy mapping per level: ``operator``, ``station``, ``ev``.

Operators, stations and individual EVs use RLlib's default modules for their
spaces.  Grouped EVs (``evs_<j>``: a station's padded EV set) use
:class:`SlotSetModule`: **one shared per-EV network** applied to every slot,
a per-slot hybrid action (mode ∈ {charge, idle, discharge} and a power
fraction), and a value from the masked mean of the per-EV embeddings.  Its
action distribution :class:`SlotDistribution` counts occupied slots only:
log-probability, entropy and KL are sums over the slots whose mask is 1.

Power fractions come from a Beta distribution, so they lie in (0, 1) by
construction; train with ``normalize_actions=False`` (RLlib's unsquashing
assumes [-1, 1] outputs).  The Gaussian heads of the default modules
(operators, individual EVs) are clipped into their spaces by the RLlib
adapter (:mod:`evgrid.agents.rllib.env`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.distribution import Distribution
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

_N_MODE = 3
_PARAMS = _N_MODE + 2 + 1  # mode logits, two Beta concentrations (raw), mask
_EPS = 1e-6


class SlotDistribution(Distribution):
    """Per-slot Categorical(mode) x Beta(power) over a padded set; empty slots contribute nothing.

    Inputs ("logits"): ``[B, S * 6]``, per slot 3 mode logits, 2 raw Beta
    concentrations (softplus + 1, so the density is unimodal) and the mask.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        p = logits.reshape(*logits.shape[:-1], -1, _PARAMS)
        self.mask = p[..., -1]
        self.cat = torch.distributions.Categorical(logits=p[..., :_N_MODE])
        self.beta = torch.distributions.Beta(F.softplus(p[..., _N_MODE]) + 1.0, F.softplus(p[..., _N_MODE + 1]) + 1.0)

    def logp(self, value: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        power = value["power"].to(self.beta.concentration1.dtype).clamp(_EPS, 1.0 - _EPS)
        lp = self.cat.log_prob(value["mode"].long()) + self.beta.log_prob(power)
        return (lp * self.mask).sum(-1)

    def entropy(self) -> torch.Tensor:
        return ((self.cat.entropy() + self.beta.entropy()) * self.mask).sum(-1)

    def kl(self, other: SlotDistribution) -> torch.Tensor:
        kl = torch.distributions.kl_divergence(self.cat, other.cat) + torch.distributions.kl_divergence(
            self.beta, other.beta)
        return (kl * self.mask).sum(-1)

    def sample(self, *, sample_shape=None, **kwargs: Any) -> dict[str, torch.Tensor]:
        shape = sample_shape if sample_shape is not None else torch.Size()
        return {"mode": self.cat.sample(shape), "power": self.beta.sample(shape).clamp(_EPS, 1.0 - _EPS)}

    def rsample(self, *, sample_shape=None, **kwargs: Any):
        raise NotImplementedError("SlotDistribution: the discrete mode has no reparameterised sample")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, **kwargs: Any) -> SlotDistribution:
        return cls(logits)

    @staticmethod
    def required_input_dim(space: gym.Space, **kwargs: Any) -> int:
        return int(space["power"].shape[0]) * _PARAMS

    def to_deterministic(self) -> _SlotArgmax:
        return _SlotArgmax(self)


class _SlotArgmax(Distribution):
    """Greedy version: the most likely mode, the Beta mean as power."""

    def __init__(self, d: SlotDistribution) -> None:
        super().__init__()
        self.d = d

    def sample(self, *, sample_shape=None, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {"mode": self.d.cat.logits.argmax(-1), "power": self.d.beta.mean.clamp(_EPS, 1.0 - _EPS)}

    def rsample(self, **kwargs: Any):
        raise NotImplementedError

    def logp(self, value, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("a greedy policy has no log-probability")

    def entropy(self) -> torch.Tensor:
        return torch.zeros(self.d.mask.shape[:-1])

    def kl(self, other) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_logits(cls, logits: torch.Tensor, **kwargs: Any) -> _SlotArgmax:
        return cls(SlotDistribution(logits))

    @staticmethod
    def required_input_dim(space: gym.Space, **kwargs: Any) -> int:
        return SlotDistribution.required_input_dim(space)

    def to_deterministic(self) -> _SlotArgmax:
        return self


def _mlp(n_in: int, hidden: list[int], n_out: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.Tanh()]
        n_in = h
    if n_out is not None:
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class SlotSetModule(TorchRLModule, ValueFunctionAPI):
    """One shared per-EV network over a station's padded EV set.

    ``model_config``: ``hidden`` (list of layer widths, default [64, 64]).
    Each slot's input is its EV features and the station context; the value
    head reads the masked mean of the slot embeddings and the context.
    """

    def setup(self) -> None:
        obs = self.observation_space
        n_slot, n_feat = obs["evs"].shape
        n_ctx = obs["context"].shape[0]
        hidden = list(self.model_config.get("hidden", [64, 64]))
        self.n_slot = n_slot
        self.ev_net = _mlp(n_feat + n_ctx, hidden)
        self.pi_head = nn.Linear(hidden[-1], _PARAMS - 1)
        self.vf_net = _mlp(hidden[-1] + n_ctx, hidden, 1)
        # start close to uncontrolled charging (mode charge, power ~0.65): exploration then learns when to
        # wait or discharge, instead of first having to discover that EVs must charge at all
        nn.init.zeros_(self.pi_head.weight)
        with torch.no_grad():
            self.pi_head.bias.copy_(torch.tensor([1.5, 0.0, -1.5, 1.0, -1.0]))

    def _embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-slot embeddings (zero in empty slots), the mask, the context.  Only occupied slots go through
        the network: padding is often a third of a station's slots."""
        obs = batch[Columns.OBS]
        evs, mask, ctx = obs["evs"].float(), obs["mask"].float(), obs["context"].float()
        occ = mask > 0
        ctx_slot = ctx.unsqueeze(-2).expand(*mask.shape, ctx.shape[-1])  # a view: gathered for occupied slots only
        h = self.ev_net(torch.cat([evs[occ], ctx_slot[occ]], dim=-1))
        out = h.new_zeros(*mask.shape, h.shape[-1])
        out[occ] = h
        return out, mask, ctx

    def _forward(self, batch: dict, **kwargs: Any) -> dict:
        h, mask, _ = self._embed(batch)
        params = torch.cat([self.pi_head(h), mask.unsqueeze(-1)], dim=-1)
        return {Columns.ACTION_DIST_INPUTS: params.flatten(-2)}

    def compute_values(self, batch: dict, embeddings: Any = None) -> torch.Tensor:
        h, mask, ctx = self._embed(batch)
        pooled = h.sum(-2) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return self.vf_net(torch.cat([pooled, ctx], dim=-1)).squeeze(-1)

    def get_inference_action_dist_cls(self):
        return _SlotArgmax

    def get_exploration_action_dist_cls(self):
        return SlotDistribution

    def get_train_action_dist_cls(self):
        return SlotDistribution


LEVELS = ("operator", "station", "ev")


def module_of(agent_id: str) -> str:
    """Policy mapping: one module per level (``ev_<k>`` and ``evs_<j>`` both map to ``ev``)."""
    kind = agent_id.split("_")[0]
    return "ev" if kind in ("ev", "evs") else kind


def policy_mapping_fn(agent_id: str, episode: Any = None, **kwargs: Any) -> str:
    return module_of(agent_id)


def module_specs(env: Any, model_config: dict | None = None) -> MultiRLModuleSpec:
    """A module spec per level present in ``env`` (an EVGridEnv or its RLlib adapter)."""
    inner = getattr(env, "env", env)
    specs: dict[str, RLModuleSpec] = {}
    for agent in inner.possible_agents:
        mid = module_of(agent)
        if mid in specs:
            continue
        obs_space, act_space = inner.observation_space(agent), inner.action_space(agent)
        cls = SlotSetModule if agent.startswith("evs_") else None
        specs[mid] = RLModuleSpec(module_class=cls, observation_space=obs_space, action_space=act_space,
                                  model_config=dict(model_config or {}))
    return MultiRLModuleSpec(rl_module_specs=specs)
