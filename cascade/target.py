"""What `build` aims for: the reference's accuracy, an accuracy, a drop in points, or a cost budget (no heavy
imports: the CLI checks --target while it parses)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rescascade.serve.errors import ConfigError, check_number

KINDS = ("best", "accuracy", "max_drop", "budget")


@dataclass
class Target:
    """What `build` aims for. Make one with Target.best(), .accuracy(0.712), .max_drop(0.5), .budget_ms(2.0), or
    parse the CLI's text; ConfigError (a ValueError) for a value out of range or ambiguous."""
    kind: str            # best | accuracy | max_drop | budget
    value: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"Target kind {self.kind!r}: use Target.best(), .accuracy(a), .max_drop(points) or "
                              ".budget_ms(ms)")
        if (self.value is None) != (self.kind == "best"):
            raise ConfigError(f"Target {self.kind!r} {'takes no' if self.kind == 'best' else 'needs a'} value")

    @classmethod
    def best(cls) -> "Target":
        """The reference's accuracy on calib."""
        return cls("best")

    @classmethod
    def accuracy(cls, top1: float) -> "Target":
        """At least `top1` (a fraction in (0, 1]) on calib."""
        return cls.parse(repr(check_number("target", top1)), None, None)

    @classmethod
    def max_drop(cls, points: float) -> "Target":
        """At most `points` percentage points (0..100) below the reference on calib."""
        return cls.parse(None, check_number("max_drop", points, 0, 100), None)

    @classmethod
    def budget_ms(cls, ms: float) -> "Target":
        """The most accurate cascade whose expected cost is at most `ms` per image."""
        return cls.parse(None, None, check_number("budget", ms))

    @classmethod
    def parse(cls, target: str | None, max_drop: float | None, budget: float | None) -> "Target":
        given = [x is not None for x in (target, max_drop, budget)]
        if sum(given) > 1:
            raise ConfigError("give one of --target, --max-drop, --budget")
        if budget is not None:
            if not (math.isfinite(budget) and budget > 0):
                raise ConfigError(f"--budget must be a positive cost in ms, got {budget}")
            return cls("budget", float(budget))
        if max_drop is not None:
            if not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
                raise ConfigError(f"--max-drop is in accuracy points, 0 to 100, got {max_drop}")
            return cls("max_drop", float(max_drop))
        if target in (None, "best"):
            return cls("best")
        text = str(target).strip()
        percent = text.endswith("%")
        try:
            v = float(text.rstrip("%").strip())
        except ValueError:
            raise ConfigError(f"--target {target!r}: use 'best' or an accuracy, 0.712 or 71.2%") from None
        if percent:
            v /= 100
        elif v > 1:  # 1.5 could mean 1.5 % or a typo for 0.15: say so rather than guess
            raise ConfigError(f"--target {target} is ambiguous: an accuracy is a fraction such as 0.712, or a percentage "
                              f"written with %, such as 71.2%")
        if not 0 < v <= 1:
            raise ConfigError(f"--target {target}: an accuracy lies in (0, 1], or (0 %, 100 %]")
        return cls("accuracy", v)

    def min_accuracy(self, reference_acc: float) -> float | None:
        if self.kind == "best":
            return reference_acc
        if self.kind == "accuracy":
            return self.value
        if self.kind == "max_drop":
            return reference_acc - self.value / 100
        return None

    def describe(self) -> str:
        if self.kind == "best":
            return "accuracy >= the reference's on calib"
        if self.kind == "accuracy":
            return f"accuracy >= {self.value:.4f} on calib"
        if self.kind == "max_drop":
            return f"at most {self.value:g} points below the reference on calib"
        return f"most accurate with expected cost <= {self.value:g} ms"
