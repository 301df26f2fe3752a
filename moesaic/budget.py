"""A request's budget: the latency and energy it may use, 0 meaning unbounded.

The one Budget type of the project: the planner and the dispatcher solve against it, the fleet
config's ``coordinator.default_budget``, the bridge's per-sensor ``budget``, ``moesaic select``'s
problem files and its ``--latency-ms``/``--energy-mj`` flags all validate into it. Both limits
must be finite and >= 0; unknown keys are refused.

>>> Budget(latency_ms=80).bounded
True
>>> Budget().bounded
False
>>> Budget(latency_ms=float("nan"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for Budget
...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["UNBOUNDED", "Budget"]


class Budget(BaseModel):
    """Per-request limits; 0 means unbounded (a budget of 0 ms is no limit, not an impossible one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="Latency budget in milliseconds; 0 = unbounded."
    )
    energy_mj: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="Energy budget in millijoules; 0 = unbounded."
    )

    @property
    def bounded(self) -> bool:
        """True when either limit is set."""
        return self.latency_ms > 0 or self.energy_mj > 0


UNBOUNDED = Budget()
"""The budget with no limit."""
