"""Per-device availability on a compressed clock: when is a simulated phone charging, idle and
on unmetered Wi-Fi?

Production fleets are eligible mostly at night (charging by the bed): Bonawitz et al. 2019
report a day/night swing of about 4x in eligible devices, and FedScale's traces show the same
shape. Each device here gets a seeded trace: its own timezone shift, a nightly charging window
(start and length drawn around 23:00 and 7 hours), and occasional daytime windows (desk
charging), re-drawn every simulated day. Everything is a pure function of (seed, device, time).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AvailabilityModel", "DeviceTrace", "FleetClock", "eligible_fraction"]

DAY = 86400.0


@dataclass(frozen=True)
class FleetClock:
    """Simulated time runs ``day_seconds`` real seconds per day, from ``start_hour``."""

    day_seconds: float = 600.0
    start_hour: float = 20.0
    t0: float = 0.0  # real time (time.time()) of simulated ``start_hour``

    def sim_seconds(self, real: float) -> float:
        return self.start_hour * 3600 + (real - self.t0) * DAY / self.day_seconds

    def hour(self, real: float) -> float:
        return (self.sim_seconds(real) / 3600.0) % 24.0

    def real_seconds(self, sim: float) -> float:
        """Real seconds for a simulated duration."""
        return sim * self.day_seconds / DAY


@dataclass(frozen=True)
class AvailabilityModel:
    night_start_hour: float = 23.0  # mean start of the nightly charging window (local time)
    night_start_sd: float = 1.5
    night_hours: float = 7.0  # mean length
    night_hours_sd: float = 1.5
    day_windows: float = 3.0  # mean number of daytime windows per day (desk or car charging)
    day_window_hours: float = 1.0  # mean length of one (exponential)
    night_coverage: float = 0.85  # probability of charging overnight at all on a given day
    tz_spread_hours: float = 3.0  # devices spread over this many timezones


def _rng(seed: int, device: int, day: int) -> np.random.Generator:
    digest = hashlib.sha256(f"avail:{seed}:{device}:{day}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class DeviceTrace:
    """Eligibility windows of one device: a deterministic function of (seed, device, time)."""

    seed: int
    device: int
    model: AvailabilityModel = AvailabilityModel()

    @property
    def tz_shift(self) -> float:
        r = _rng(self.seed, self.device, -1)
        return float(r.uniform(-self.model.tz_spread_hours / 2, self.model.tz_spread_hours / 2))

    def windows(self, day: int) -> list[tuple[float, float]]:
        """Windows (start, end) in simulated seconds of local day ``day`` (may cross midnight)."""
        m = self.model
        r = _rng(self.seed, self.device, day)
        out = []
        if r.random() < m.night_coverage:
            start = (r.normal(m.night_start_hour, m.night_start_sd) % 24) * 3600
            length = max(r.normal(m.night_hours, m.night_hours_sd), 0.5) * 3600
            out.append((day * DAY + start, day * DAY + start + length))
        for _ in range(r.poisson(m.day_windows)):
            start = r.uniform(8, 20) * 3600
            length = r.exponential(m.day_window_hours) * 3600
            out.append((day * DAY + start, day * DAY + start + length))
        return out

    def eligible(self, sim_seconds: float) -> bool:
        local = sim_seconds + self.tz_shift * 3600
        day = math.floor(local / DAY)
        return any(a <= local < b for d in (day - 1, day) for a, b in self.windows(d))


def eligible_fraction(traces: list[DeviceTrace], sim_seconds: float) -> float:
    return sum(t.eligible(sim_seconds) for t in traces) / max(len(traces), 1)
