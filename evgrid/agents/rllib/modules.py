"""RLModules and policy mapping per level: ``operator``, ``station``, ``ev``.

Operators, stations and individual EVs use RLlib's default modules for their
spaces; with P-DQN (``hybrid_evs``) individual EVs use
:class:`evgrid.agents.rllib.pdqn.PDQNTorchRLModule` instead, acting in
``hybrid_action_space`` (one power per mode; the environment is sent the
chosen mode's, see :class:`evgrid.agents.rllib.pdqn.ChosenModeParameter`),
and grouped EVs :class:`evgrid.agents.rllib.pdqn.GroupedPDQNTorchRLModule`
(one shared per-slot P-DQN, the station's Q the sum over its occupied slots).
Otherwise grouped EVs (``evs_<j>``: a station's padded EV set) use
:class:`SlotSetModule`: **one shared per-EV network** applied to every slot,
a per-slot hybrid action (mode ∈ {charge, idle, discharge} and a power
fraction), and a value from the masked mean of the per-EV embeddings.  Its
action distribution :class:`SlotDistribution` counts occupied slots only:
log-probability, entropy and KL are sums over the slots whose mask is 1.

Power fractions come from a Beta distribution, so they lie in (0, 1) by
construction; train with ``normalize_actions=False`` (RLlib's unsquashing
assumes [-1, 1] outputs).  The Gaussian heads of the default modules
(operators, individual EVs) are clipped into their spaces by the RLlib
adapter (:mod:`evgrid.agents.rllib.env`); operators' Box actions are learned in
[-1, 1] and scaled into theirs (:func:`evgrid.agents.rllib.env.to_env_action`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.distribution import Distribution
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch import nn
from torch.nn import functional as F  # noqa: N812

from evgrid.agents.rllib.env import operator_module_space
from evgrid.agents.rllib.pdqn import (
    GroupedPDQNTorchRLModule,
    PDQNTorchRLModule,
    grouped_hybrid_action_space,
    hybrid_action_space,
)

_N_MODE = 3
_PARAMS = _N_MODE + 2 + 1  # mode logits, two Beta concentrations (raw), mask
_EPS = 1e-6


def _flat_samples(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[k, *batch]`` -> ``[k, prod(shape)]`` with ``shape = sample_shape + batch`` (a view without samples)."""
    lead = len(shape) - (t.dim() - 1)
    return t.reshape(t.shape[0], *([1] * lead), *t.shape[1:]).expand(t.shape[0], *shape).reshape(t.shape[0], -1)


class SlotDistribution(Distribution):
    """Per-slot Categorical(mode) x Beta(power) over a padded set; empty slots contribute nothing.

    Inputs ("logits"): ``[B, S * 6]``, per slot 3 mode logits, 2 raw Beta
    concentrations (softplus + 1, so the density is unimodal) and the mask.
    Densities, entropies and KLs are written out rather than taken from
    ``torch.distributions``, whose argument checks and broadcasting cost more
    than the maths on a vector step's ~10^4 slots.
    """

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        p = logits.reshape(*logits.shape[:-1], logits.shape[-1] // _PARAMS, _PARAMS)
        # parameter-major copy: elementwise maths on the strided per-slot columns costs several times more
        cols = p.movedim(-1, 0).contiguous()  # [6, ..., S]
        self.mask = cols[-1]
        self.logits = cols[:_N_MODE]
        self.log_probs = torch.log_softmax(self.logits, dim=0)
        self.conc = F.softplus(cols[_N_MODE:_N_MODE + 2]) + 1.0  # Beta's (a, b): [2, ..., S]
        self._lbeta: torch.Tensor | None = None

    def _log_beta_fn(self) -> torch.Tensor:
        """log B(a, b), shared by the density and the entropy."""
        if self._lbeta is None:
            self._lbeta = torch.lgamma(self.conc).sum(0) - torch.lgamma(self.conc.sum(0))
        return self._lbeta

    def logp(self, value: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return ((self.mode_logp(value["mode"]) + self.power_logp(value["power"])) * self.mask).sum(-1)

    def mode_logp(self, mode: torch.Tensor) -> torch.Tensor:
        """``[..., S]`` log-probability of each slot's mode."""
        return self.log_probs.gather(0, mode.long().unsqueeze(0)).squeeze(0)

    def power_logp(self, power: torch.Tensor) -> torch.Tensor:
        """``[..., S]`` log-density of each slot's power fraction."""
        power = power.to(self.conc.dtype).clamp(_EPS, 1.0 - _EPS)
        a, b = self.conc
        return (a - 1.0) * torch.log(power) + (b - 1.0) * torch.log1p(-power) - self._log_beta_fn()

    def entropy(self) -> torch.Tensor:
        h_mode = -(self.log_probs.exp() * self.log_probs).sum(0)
        a, b = self.conc
        s = a + b
        h_power = (self._log_beta_fn() - (a - 1.0) * torch.digamma(a) - (b - 1.0) * torch.digamma(b)
                   + (s - 2.0) * torch.digamma(s))
        return ((h_mode + h_power) * self.mask).sum(-1)

    def kl(self, other: SlotDistribution) -> torch.Tensor:
        kl_mode = (self.log_probs.exp() * (self.log_probs - other.log_probs)).sum(0)
        (a, b), (a2, b2) = self.conc, other.conc
        s, s2 = a + b, a2 + b2
        kl_power = (other._log_beta_fn() - self._log_beta_fn() + (a - a2) * torch.digamma(a)
                    + (b - b2) * torch.digamma(b) + (s2 - s) * torch.digamma(s))
        return ((kl_mode + kl_power) * self.mask).sum(-1)

    def sample(self, *, sample_shape=None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Occupied slots are sampled; empty ones (ignored by the env) get mode 1 (idle) and power 0.5."""
        shape = torch.Size(sample_shape if sample_shape is not None else ()) + self.mask.shape
        with torch.no_grad():
            idx = (_flat_samples(self.mask.unsqueeze(0), shape)[0] > 0).nonzero().squeeze(-1)
            lp = _flat_samples(self.log_probs, shape).index_select(1, idx)
            # mode: inverse CDF of the 3 classes, one uniform per slot (far cheaper than multinomial)
            cdf0 = lp[0].exp()
            u = torch.rand(idx.shape, dtype=lp.dtype, device=lp.device)
            mode = (u >= cdf0).long() + (u >= cdf0 + lp[1].exp())
            # power: a true Beta(a, b) sample X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b) (torch's own Gamma sampler,
            # clamped to the smallest positive float as torch.distributions.Gamma does)
            g = torch._standard_gamma(_flat_samples(self.conc, shape).index_select(1, idx))
            g.clamp_(min=torch.finfo(g.dtype).tiny)
            n = shape.numel()
            modes = torch.ones(n, dtype=torch.long, device=lp.device).index_copy_(0, idx, mode)
            power = torch.full((n,), 0.5, dtype=lp.dtype, device=lp.device).index_copy_(0, idx, g[0] / g.sum(0))
        return {"mode": modes.reshape(shape), "power": power.clamp_(_EPS, 1.0 - _EPS).reshape(shape)}

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
        a, b = self.d.conc
        return {"mode": self.d.log_probs.argmax(0), "power": (a / (a + b)).clamp(_EPS, 1.0 - _EPS)}

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
        """Embeddings of the occupied slots only ``[n_occ, hidden]``, their flat slot indices, the mask.
        Padding is often a third of a station's slots: it never goes through the network, and no
        ``[B, S, hidden]`` tensor is built."""
        obs = batch[Columns.OBS]
        evs, mask, ctx = obs["evs"].float(), obs["mask"].float(), obs["context"].float()
        idx = (mask.reshape(-1) > 0).nonzero().squeeze(-1)
        x = torch.cat([evs.reshape(-1, evs.shape[-1]).index_select(0, idx),
                       ctx.reshape(-1, ctx.shape[-1]).index_select(0, idx // mask.shape[-1])], dim=-1)
        for layer in self.ev_net:
            # tanh in place: one [n_occ, hidden] buffer less per layer (the Linear before needs no output for
            # its backward)
            x = x.tanh_() if isinstance(layer, nn.Tanh) else layer(x)
        return x, idx, mask

    def _dist_inputs(self, h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[..., S * 6]``: the head's output in occupied slots, its bias (a zero embedding's) in empty ones."""
        flat_mask = mask.reshape(-1, 1)
        n_out = self.pi_head.out_features
        params = torch.cat([self.pi_head.bias.expand(flat_mask.shape[0], n_out), flat_mask], dim=-1)
        head = torch.cat([self.pi_head(h), flat_mask.index_select(0, idx)], dim=-1)
        return params.index_copy(0, idx, head).reshape(*mask.shape[:-1], mask.shape[-1] * _PARAMS)

    def _pool(self, h: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the slot embeddings, ``[..., hidden]``."""
        lead = mask.shape[:-1]
        total = h.new_zeros(lead.numel(), h.shape[-1]).index_add(0, idx // mask.shape[-1], h)
        return total.reshape(*lead, h.shape[-1]) / mask.sum(-1, keepdim=True).clamp(min=1.0)

    def _forward(self, batch: dict, **kwargs: Any) -> dict:
        h, idx, mask = self._embed(batch)
        return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(h, idx, mask)}

    def _forward_train(self, batch: dict, **kwargs: Any) -> dict:
        # the pooled embedding rides along, so the loss's compute_values does not run ev_net a second time
        h, idx, mask = self._embed(batch)
        return {Columns.ACTION_DIST_INPUTS: self._dist_inputs(h, idx, mask),
                Columns.EMBEDDINGS: self._pool(h, idx, mask)}

    def compute_values(self, batch: dict, embeddings: Any = None) -> torch.Tensor:
        if embeddings is None:
            h, idx, mask = self._embed(batch)
            embeddings = self._pool(h, idx, mask)
        ctx = batch[Columns.OBS]["context"].float()
        return self.vf_net(torch.cat([embeddings, ctx], dim=-1)).squeeze(-1)

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


def module_specs(env: Any, model_config: dict | None = None, *, hybrid_evs: bool = False) -> MultiRLModuleSpec:
    """A module spec per level present in ``env`` (an EVGridEnv or its RLlib adapter); ``hybrid_evs``:
    individual EVs get a P-DQN module with a power per mode (mode charge, idle, discharge), grouped EVs its slot
    set version (one shared per-slot network, a power per mode and slot)."""
    inner = getattr(env, "env", env)
    specs: dict[str, RLModuleSpec] = {}
    for agent in inner.possible_agents:
        mid = module_of(agent)
        if mid in specs:
            continue
        obs_space, act_space = inner.observation_space(agent), inner.action_space(agent)
        if agent.startswith("operator_"):
            act_space = operator_module_space(act_space)  # learned in [-1, 1], scaled by the adapter
        cls = SlotSetModule if agent.startswith("evs_") else None
        if hybrid_evs and agent.startswith("ev_"):
            n_mode, box = act_space["mode"].n, act_space["power"]
            cls = PDQNTorchRLModule
            act_space = hybrid_action_space(np.repeat(box.low, n_mode), np.repeat(box.high, n_mode))
        elif hybrid_evs and agent.startswith("evs_"):
            # every slot has the same modes and power range: one (K,) range per slot
            nvec, box = np.asarray(act_space["mode"].nvec), act_space["power"]
            n_mode = int(nvec[0])
            cls = GroupedPDQNTorchRLModule
            act_space = grouped_hybrid_action_space(len(nvec), np.full(n_mode, box.low[0]),
                                                    np.full(n_mode, box.high[0]))
        specs[mid] = RLModuleSpec(module_class=cls, observation_space=obs_space, action_space=act_space,
                                  model_config=dict(model_config or {}))
    return MultiRLModuleSpec(rl_module_specs=specs)
