"""The power-flow interface shared by every backend.

A backend solves a *batch* of B scenarios on one feeder.  Inputs are net
loads per bus in the feeder's bus order (``Feeder.bus_ids``):

    p_kw[B, n_bus], q_kvar[B, n_bus]   load positive, generation negative

and the result is a :class:`FlowResult`.  A scenario that does not converge
is data (``converged[b] = False``, its results NaN), never an exception.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from evgrid.grid.feeders import Feeder
from evgrid.validate import as_batch


@dataclass(eq=False, slots=True)
class FlowResult:
    """Solved batch.  Non-converged scenarios hold NaN in every float field.

    Not frozen: a plain slotted class keeps construction cheap on the
    per-step hot path; treat it as read-only.
    """

    vm_pu: npt.NDArray[np.float64]  # (B, n_bus)
    va_deg: npt.NDArray[np.float64]  # (B, n_bus)
    line_loading: npt.NDArray[np.float64]  # (B, n_line) current / ampacity (1.0 = at rating)
    trafo_loading: npt.NDArray[np.float64]  # (B, n_trafo) current / rated current
    loss_kw: npt.NDArray[np.float64]  # (B,) active losses, >= 0
    slack_p_kw: npt.NDArray[np.float64]  # (B,) power drawn from the upstream grid
    slack_q_kvar: npt.NDArray[np.float64]  # (B,)
    converged: npt.NDArray[np.bool_]  # (B,)
    iterations: npt.NDArray[np.int64]  # (B,)
    state: npt.NDArray[np.complex128] | None = None  # backend's warm-start state, opaque

    @property
    def batch(self) -> int:
        return int(self.vm_pu.shape[0])

    def take(self, rows: slice | npt.NDArray[np.int64], state: bool = True) -> FlowResult:
        """The scenarios ``rows`` (views for a slice); ``state=False`` drops the warm-start state."""
        out = {name: (v[rows] if (v := getattr(self, name)) is not None else None) for name in _FLOW_FIELDS}
        if not state:
            out["state"] = None
        return FlowResult(**out)

    @staticmethod
    def concat(flows: Sequence[FlowResult]) -> FlowResult:
        """Results stacked along the scenario axis (a state only where every part has one)."""
        if len(flows) == 1:
            return flows[0]
        out = {}
        for name in _FLOW_FIELDS:
            parts = [getattr(x, name) for x in flows]
            out[name] = None if any(p is None for p in parts) else np.concatenate(parts)
        return FlowResult(**out)

    @staticmethod
    def scatter(parts: Sequence[tuple[FlowResult, npt.NDArray[np.int64]]], n: int) -> FlowResult:
        """One batch of ``n`` scenarios from results that each cover the given rows (a state only where every
        part has one)."""
        out = {}
        for name in _FLOW_FIELDS:
            if any(getattr(p, name) is None for p, _ in parts):
                out[name] = None
                continue
            v0 = getattr(parts[0][0], name)
            a = np.empty((n, *v0.shape[1:]), dtype=v0.dtype)
            for p, rows in parts:
                a[rows] = getattr(p, name)
            out[name] = a
        return FlowResult(**out)


_FLOW_FIELDS = tuple(f.name for f in fields(FlowResult))


class PowerFlowBackend(ABC):
    """Solve batches of load scenarios on one feeder.

    Subclasses implement :meth:`_solve`; :meth:`solve` validates the inputs
    (shape, finiteness) so every backend rejects bad input the same way.
    """

    name: str = "abstract"
    checks_finite: bool = False  # True where _solve itself rejects NaN/inf inputs

    def __init__(self, feeder: Feeder) -> None:
        self.feeder = feeder

    def solve(
        self,
        p_kw: npt.ArrayLike,
        q_kvar: npt.ArrayLike,
        init: FlowResult | None = None,
    ) -> FlowResult:
        """Solve the batch; ``init`` (a previous result of the same backend and
        batch size) warm-starts the solver where the backend supports it."""
        p = as_batch("p_kw", p_kw, self.feeder.n_bus, not self.checks_finite)
        q = as_batch("q_kvar", q_kvar, self.feeder.n_bus, not self.checks_finite)
        if p.shape != q.shape:
            raise ValueError(f"q_kvar: expected shape {p.shape} like p_kw, got {q.shape}")
        if init is not None and init.batch != p.shape[0]:
            raise ValueError(f"init: warm start from a batch of {init.batch} scenarios, expected {p.shape[0]}")
        return self._solve(p, q, init)

    @abstractmethod
    def _solve(self, p_kw: np.ndarray, q_kvar: np.ndarray, init: FlowResult | None) -> FlowResult: ...


def nan_result(batch: int, feeder: Feeder) -> dict[str, np.ndarray]:
    """Output arrays filled with NaN, for backends that fill them scenario by scenario."""
    return dict(
        vm_pu=np.full((batch, feeder.n_bus), np.nan),
        va_deg=np.full((batch, feeder.n_bus), np.nan),
        line_loading=np.full((batch, feeder.n_line), np.nan),
        trafo_loading=np.full((batch, feeder.n_trafo), np.nan),
        loss_kw=np.full(batch, np.nan),
        slack_p_kw=np.full(batch, np.nan),
        slack_q_kvar=np.full(batch, np.nan),
        converged=np.zeros(batch, dtype=bool),
        iterations=np.zeros(batch, dtype=np.int64),
    )
