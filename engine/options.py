"""Method names and their options: small frozen dataclasses validated on construction.

The registry here is the one list of methods: the facade, `available_methods()` and the CLI's
`choices=` all read it, so an unknown name gets the same list of valid ones everywhere.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .lrp import LRP_RULES
from .reference import HEAD_FUSIONS, IG_BASELINES, IG_METHODS


def check_int(name: str, value, minimum: int | None = None) -> int:
    """`value` as an int: Python or numpy integers (not bools, not floats, even integral ones)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _normalize(options, name: str, value) -> None:
    """Store a checked value in a frozen options dataclass (numpy scalars become Python numbers, so
    the options compare, hash and serialize as the same options given as Python numbers)."""
    object.__setattr__(options, name, value)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class RawAttentionOptions:
    layer: int = -1  # which layer's attention (negative counts from the last); checked against the model

    def __post_init__(self):
        _normalize(self, "layer", check_int("layer", self.layer))


@dataclass(frozen=True)
class RolloutOptions:
    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    causal_quantile: bool = False  # take the discard quantile over the lower triangle only
    full_matrix: bool = True  # also return the (S, S) rollout; False computes only the row read (O(L S^2))

    def __post_init__(self):
        _check_choice("head_fusion", self.head_fusion, HEAD_FUSIONS)
        if isinstance(self.discard_ratio, bool) or not isinstance(self.discard_ratio, numbers.Real):
            raise TypeError(f"discard_ratio must be a float, got {self.discard_ratio!r}")
        _normalize(self, "discard_ratio", float(self.discard_ratio))
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")
        for name in ("causal_quantile", "full_matrix"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class GradAttentionOptions:
    pass


@dataclass(frozen=True)
class IntegratedGradientsOptions:
    n_steps: int = 50
    ig_method: str = "gausslegendre"
    baseline: str = "replacement"

    def __post_init__(self):
        _normalize(self, "n_steps", check_int("n_steps", self.n_steps, minimum=1))
        _check_choice("ig_method", self.ig_method, IG_METHODS)
        _check_choice("baseline", self.baseline, IG_BASELINES)
        if self.ig_method == "riemann_trapezoid" and self.n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")


@dataclass(frozen=True)
class LeaveOneOutOptions:
    pass


@dataclass(frozen=True)
class SlidingWindowOptions:
    window_size: int = 3  # checked against each text's length when it runs

    def __post_init__(self):
        _normalize(self, "window_size", check_int("window_size", self.window_size, minimum=1))


@dataclass(frozen=True)
class LRPOptions:
    rule: str = "attnlrp"  # "attnlrp" (Achtibat et al. 2024) or "cplrp" (Ali et al. 2022)

    def __post_init__(self):
        _check_choice("rule", self.rule, LRP_RULES)


OPTIONS = {
    "raw_attention": RawAttentionOptions,
    "rollout": RolloutOptions,
    "grad_attention": GradAttentionOptions,
    "integrated_gradients": IntegratedGradientsOptions,
    "leave_one_out": LeaveOneOutOptions,
    "sliding_window": SlidingWindowOptions,
    "lrp": LRPOptions,
}


def available_methods() -> list[str]:
    """The method names `Explainer.attribute` accepts."""
    return list(OPTIONS)


def make_options(method: str, **options):
    """Validate a method name and its keyword options into that method's options dataclass."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {available_methods()}, got {method!r}")
    if method not in OPTIONS:
        raise ValueError(f"unknown method {method!r}; available methods: {available_methods()}")
    cls = OPTIONS[method]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid or 'none'}")
    return cls(**options)


def check_method_options(methods: list[str], options: dict[str, dict], action: str, name: str = "options") -> None:
    """At least one method, and per-method options (the argument `name`) only for methods in
    `methods`; `action` ("compared", "evaluated") says in the message what is done with them."""
    if not methods:
        raise ValueError(f"methods must name at least one of {available_methods()}")
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ValueError(f"{name} given for methods not {action}: {unknown}")
