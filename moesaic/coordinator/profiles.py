"""A replica's live cost profile: what a call sent now should take and spend.

Predicted latency = expected wait in the node's queue + service time + network time:

- **service** (pre + engine + post on the node): the node's ``compute_ms`` of every reply,
  as an EWMA, plus ``latency_deviations`` x its mean absolute deviation (so a prediction is a
  high quantile, not the mean: with 3, about the 99th percentile); before the first reply, the
  fleet config's override, the node's profile file, or the service time the node measured on
  its load-time probe (``Describe``), in that order;
- **network**: round trip less the node's queue and compute time, as an EWMA; before the first
  reply, the ``Describe`` round trip (0 when the fleet config gives the latency);
- **wait**: the larger of what the node last reported (``expected_wait_ms`` in replies and in
  the registry's periodic ``Describe``, counted down since) and the service time still ahead
  of the calls this coordinator has in flight there.

A call that got no reply within ``w`` ms sets a floor of ``w`` under the prediction; the floor
halves every ``FLOOR_HALF_LIFE_S`` and a reply clears it, so a replica that was merely busy
is tried again soon while a hung one is waited for longer each time (``deadline_slack`` x the
floor).

Predicted energy is the node's attributed energy per inference (the figure its replies
carry), as an EWMA; before the first reply, the override, the profile file, or what the
node's ``Describe`` reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from moesaic.coordinator.config import CoordinatorSettings, ExpertOverride
from moesaic.nodes.client import InferResult

__all__ = ["FLOOR_HALF_LIFE_S", "STALE_S", "Profile"]

FLOOR_HALF_LIFE_S = 2.0
STALE_S = 5.0
"""Seconds without a reply after which the node's own figures pull a profile back (refresh)."""


@dataclass
class Profile:
    service_ms: float
    network_ms: float
    energy_mj: float
    energy_source: str = "estimate"
    replies: int = 0
    deviations: float = 3.0
    """Mean absolute deviations of the service time added to its mean in predictions."""
    service_dev_ms: float = 0.0
    drift: float = 0.25
    """Relative change of latency or energy that counts as a new profile (see :meth:`observe`)."""
    _wait_ms: float = 0.0
    _wait_at: float = 0.0
    _floor_ms: float = 0.0
    _floor_at: float = 0.0
    _reply_at: float = 0.0
    _best_ms: float = math.inf
    """The shortest service time a reply reported (the replica unloaded, as far as seen)."""
    _inflight: dict[int, float] = field(default_factory=dict)
    _anchor: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        self._anchor = (self.latency_ms, self.energy_mj)

    @classmethod
    def prior(
        cls,
        model: Any,
        override: ExpertOverride | None,
        settings: CoordinatorSettings,
        round_trip_ms: float,
    ) -> Profile:
        """The profile of a model just discovered (``model``: its ``ModelDescription``)."""
        service, energy, source = _prior_costs(model, override, settings)
        # A configured latency is the whole figure; otherwise the Describe round trip stands in
        # for the network (it includes connecting: an over-estimate, on the safe side).
        given = override is not None and override.latency_ms is not None
        network = 0.0 if given else max(round_trip_ms, 0.0)
        p = cls(
            service,
            network,
            energy,
            source,
            deviations=settings.latency_deviations,
            drift=settings.profile_drift,
        )
        p.report_wait(model.expected_wait_ms, time.monotonic())
        return p

    def refresh(self, model: Any, override: ExpertOverride | None, now: float) -> None:
        """The node's newer figures from its ``Describe`` (``model``). Before any reply they
        replace the prior (where no profile file or override gives it). After ``STALE_S``
        without a reply, the service time moves half-way to the fastest it was seen to answer
        (or the node's own running figure, if lower) and its deviation halves, at every refresh:
        a replica the predictions priced out under a load that has gone is tried again instead
        of never being chosen (with the ``shed`` policy, never again)."""
        service, energy, _ = _prior_costs(model, override, None)
        if self.replies == 0:
            self.service_ms, self.energy_mj = service or self.service_ms, energy or self.energy_mj
        elif now - self._reply_at > STALE_S:
            target = min(self._best_ms, model.service_ms if model.service_ms > 0 else math.inf)
            if math.isfinite(target):
                self.service_ms += 0.5 * (target - self.service_ms)
            self.service_dev_ms *= 0.5

    @property
    def latency_ms(self) -> float:
        """Service (a high quantile of it) + network on an idle node."""
        return self.service_ms + self.deviations * self.service_dev_ms + self.network_ms

    def wait_ms(self, now: float) -> float:
        reported = self._wait_ms - max(now - self._wait_at, 0.0) * 1e3
        ahead = sum(max(self.service_ms - (now - t0) * 1e3, 0.0) for t0 in self._inflight.values())
        return max(reported, ahead, 0.0)

    def floor_ms(self, now: float) -> float:
        """What the last missed deadline still says about this replica (decaying)."""
        if self._floor_ms <= 0:
            return 0.0
        return self._floor_ms * 0.5 ** (max(now - self._floor_at, 0.0) / FLOOR_HALF_LIFE_S)

    def completion_ms(self, now: float) -> float:
        """Predicted latency of a call sent at ``now``."""
        return max(self.wait_ms(now) + self.latency_ms, self.floor_ms(now))

    def report_wait(self, wait_ms: float, now: float) -> None:
        if math.isfinite(wait_ms) and wait_ms >= 0:
            self._wait_ms, self._wait_at = wait_ms, now

    @property
    def in_flight(self) -> int:
        """Calls this coordinator has sent and not yet heard back from."""
        return len(self._inflight)

    def begin(self, call: int, now: float) -> None:
        self._inflight[call] = now

    def end(self, call: int) -> None:
        self._inflight.pop(call, None)

    def observe(self, result: InferResult, round_trip_ms: float, alpha: float) -> bool:
        """Fold in one reply; True when the profile moved by more than ``drift`` since the last
        time it did (cached selections built on it are stale)."""
        params = result.parameters
        compute = result.compute_ms if math.isfinite(result.compute_ms) else round_trip_ms
        queue = _number(params.get("queue_ms"), 0.0)
        network = max(round_trip_ms - compute - queue, 0.0)
        self._best_ms = min(self._best_ms, compute)
        if self.replies == 0:  # the first reply replaces the prior outright
            self.service_ms, self.network_ms = compute, network
        else:
            self.service_dev_ms += alpha * (abs(compute - self.service_ms) - self.service_dev_ms)
            self.service_ms += alpha * (compute - self.service_ms)
            self.network_ms += alpha * (network - self.network_ms)
        energy = result.energy_mj
        if math.isfinite(energy) and energy >= 0:
            self.energy_mj = (
                energy if self.replies == 0 else self.energy_mj + alpha * (energy - self.energy_mj)
            )
            if result.energy_source:
                self.energy_source = result.energy_source
        self.report_wait(_number(params.get("expected_wait_ms"), math.nan), time.monotonic())
        self._floor_ms = 0.0
        self._reply_at = time.monotonic()
        self.replies += 1
        return self._moved()

    def observe_timeout(self, waited_ms: float, now: float) -> None:
        """A call got no reply within ``waited_ms``: predict at least that until it decays."""
        if math.isfinite(waited_ms) and waited_ms > self.floor_ms(now):
            self._floor_ms, self._floor_at = waited_ms, now

    def _moved(self) -> bool:
        lat0, en0 = self._anchor
        if abs(self.latency_ms - lat0) > self.drift * max(lat0, 1.0) or abs(
            self.energy_mj - en0
        ) > self.drift * max(en0, 1.0):
            self._anchor = (self.latency_ms, self.energy_mj)
            return True
        return False


def _prior_costs(
    model: Any, override: ExpertOverride | None, settings: CoordinatorSettings | None
) -> tuple[float, float, str]:
    """(service ms, energy mJ, energy source) of a model with no reply yet: the override, the
    node's profile file, the node's probe figures, the fleet's defaults (0 without settings)."""
    profile = min(model.profiles, key=lambda p: p.batch_size or 1) if model.profiles else None
    service = _first(
        override.latency_ms if override is not None else None,
        profile.latency_ms.p50 if profile is not None and profile.latency_ms.p50 > 0 else None,
        model.service_ms if model.service_ms > 0 else None,
        settings.default_latency_ms if settings is not None else 0.0,
    )
    energy = _first(
        override.energy_mj if override is not None else None,
        profile.energy_mj_per_inference if profile is not None else None,
        model.energy_mj if model.energy_mj > 0 else None,
        settings.default_energy_mj if settings is not None else 0.0,
    )
    source = profile.energy_source if profile is not None and profile.energy_source else "estimate"
    return service, energy, source


def _first(*values: float | None) -> float:
    return float(next(v for v in values if v is not None))


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
