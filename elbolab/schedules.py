"""Schedules as data, and the step context the trainer hands a model.

A schedule maps training progress t (in epochs, fractional within an epoch) to a value. Specs are strings, so they
travel through the CLI (``--schedule beta=linear:0:1:10``), config.json and metrics.jsonl unchanged:

* ``constant:v``                    v
* ``linear:v0:v1:epochs[:start]``   v0 until ``start``, then linearly to v1 over ``epochs``, then v1. KL warm-up
                                    (Bowman et al. 2016; Sønderby et al. 2016) is ``beta=linear:0:1:E``; capacity
                                    annealing (Burgess et al. 2018) is ``capacity=linear:0:C_max:E``.
* ``cyclical:v_max:period:ratio``   cyclical annealing (Fu et al. 2019): every ``period`` epochs the value rises
                                    linearly from 0 to v_max over the first ``ratio`` of the cycle, then stays at v_max.
* ``step:v0:factor:every``          v0 * factor ** floor(t / every): a learning rate decayed by ``factor`` every
                                    ``every`` epochs (``lr=step:0.002:0.9:10``, VaDE's schedule).
* ``geometric:v0:factor:first:growth``  stage i = 0, 1, ... lasts ``first * growth**i`` epochs at v0 * factor**i: the
                                    IWAE paper's learning rate (Burda et al. 2016, s. 5: 3^i epochs at 1e-3 *
                                    10^(-i/7), i = 0..7, 3,280 epochs) is ``lr=geometric:0.001:0.7196857:1:3``.

A model reads the values it knows from ``ctx.value(name, default)``: ``beta``, ``free_bits`` (Kingma et al. 2016),
``capacity``, or any name a model documents. The trainer reads ``lr`` (the learning rate, every step). Values named
in NON_NEGATIVE must stay >= 0 (``lr`` > 0). Models never see epochs or optimisers directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from elbolab.errors import ElbolabError

# kind -> (min, max) arguments
_KINDS = {"constant": (1, 1), "linear": (3, 4), "cyclical": (3, 3), "step": (3, 3), "geometric": (4, 4)}
_FORMS = ("constant:v, linear:v0:v1:epochs[:start], cyclical:v_max:period:ratio, step:v0:factor:every or "
          "geometric:v0:factor:first:growth")
NON_NEGATIVE = ("beta", "free_bits", "capacity", "gamma", "lr")


@dataclass(frozen=True)
class Schedule:
    """One parsed schedule spec; ``schedule(t)`` is its value after t epochs."""

    kind: str
    args: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str | float | int, name: str = "value") -> Schedule:
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            spec = repr(float(spec))
        parts = str(spec).strip().split(":")
        kind, raw = parts[0].lower(), parts[1:]
        if kind not in _KINDS:  # a bare number is a constant
            kind, raw = "constant", parts if len(parts) == 1 else [""]
        low, high = _KINDS[kind]
        try:
            args = tuple(float(a) for a in raw)
        except ValueError:
            args = ()
        infinite = next((a for a, value in zip(raw, args) if not math.isfinite(value)), None)
        if low <= len(args) <= high and infinite is not None:  # the value as the user wrote it, not our spec
            if kind == "constant":
                raise ElbolabError(f"{name}: expected a finite number, got {infinite.strip()} (a schedule's values "
                                   "must be finite)")
            raise ElbolabError(f"schedule {name}: expected finite numbers, got {infinite.strip()} in {spec!r}")
        if not low <= len(args) <= high:
            raise ElbolabError(f"schedule {name}: expected {_FORMS} with finite numbers; got {spec!r}")
        if kind == "linear" and (args[2] < 0 or (len(args) == 4 and args[3] < 0)):
            raise ElbolabError(f"schedule {name}: expected non-negative epochs and start in {spec!r}")
        if kind == "cyclical" and not (args[1] > 0 and 0 < args[2] <= 1):
            raise ElbolabError(f"schedule {name}: expected a period > 0 and a ratio in (0, 1] in {spec!r}")
        if kind == "step" and not (args[1] > 0 and args[2] > 0):
            raise ElbolabError(f"schedule {name}: expected a factor > 0 and every > 0 epochs in {spec!r}")
        if kind == "geometric" and not (args[1] > 0 and args[2] > 0 and args[3] >= 1):
            raise ElbolabError(f"schedule {name}: expected a factor > 0, a first stage > 0 epochs and a growth >= 1 "
                               f"in {spec!r}")
        values = {"constant": args[:1], "linear": args[:2], "cyclical": args[:1], "step": args[:1],
                  "geometric": args[:1]}[kind]
        if name in NON_NEGATIVE and (min(values) < 0 or (name == "lr" and min(values) <= 0)):
            raise ElbolabError(f"schedule {name}: expected {'positive' if name == 'lr' else 'non-negative'} values, "
                               f"got {spec!r}")
        return cls(kind, args)

    def __call__(self, t: float) -> float:
        if self.kind == "constant":
            return self.args[0]
        if self.kind == "linear":
            v0, v1, epochs = self.args[:3]
            start = self.args[3] if len(self.args) == 4 else 0.0
            if epochs == 0:
                return v1 if t >= start else v0
            return v0 + (v1 - v0) * min(1.0, max(0.0, (t - start) / epochs))
        if self.kind == "step":
            v0, factor, every = self.args
            return v0 * factor ** math.floor(t / every)
        if self.kind == "geometric":  # stage i lasts first * growth^i epochs at v0 * factor^i
            v0, factor, first, growth = self.args
            stage, end = 0, first
            while t >= end:
                stage += 1
                end += first * growth ** stage
            return v0 * factor ** stage
        v_max, period, ratio = self.args
        phase = (t % period) / period  # position within the current cycle, [0, 1)
        return v_max * min(1.0, phase / ratio)

    def spec(self) -> str:
        return ":".join([self.kind, *(f"{a:g}" for a in self.args)])


@dataclass(frozen=True)
class StepContext:
    """What a model may know about the step it is in: the step count, the epoch progress, the scheduled values,
    and the number of Monte-Carlo samples L per data point."""

    step: int = 0
    epoch: float = 0.0
    values: Mapping[str, float] = field(default_factory=dict)
    mc_samples: int = 1

    def value(self, name: str, default: float) -> float:
        return float(self.values.get(name, default))


def parse_schedules(specs: Mapping[str, str]) -> dict[str, Schedule]:
    return {name: Schedule.parse(spec, name) for name, spec in specs.items()}


def evaluate_schedules(schedules: Mapping[str, Schedule], t: float) -> dict[str, float]:
    return {name: schedule(t) for name, schedule in schedules.items()}
