"""The method registry: one file per method in this package, each registering a `Method` (its options
dataclass, expand and reduce steps and reference) when imported.

Every module here whose name does not start with "_" is imported below, so adding a method is adding
its file (and its reference in `engine.reference`): the facade, the CLI's choices, `available_methods()`
and the facade-vs-reference tests all read this registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from ._base import Method, PreparedText

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    """The method names `Explainer.attribute` accepts, in the specification's order."""
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].order, name))


def default_methods() -> list[str]:
    """The methods `compare`, `evaluate` and the CLI run when none are named: every registered one
    whose cost is bounded for any text (exact `shapley` is not: 2^n coalitions)."""
    return [name for name in available_methods() if _REGISTRY[name].default]


def get(method: str) -> Method:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {available_methods()}, got {method!r}")
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; available methods: {available_methods()}")
    return _REGISTRY[method]


def make_options(method: str, **options):
    """Validate a method name and its keyword options into that method's options dataclass."""
    cls = get(method).options
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid or 'none'}")
    return cls(**options)


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "PreparedText", "available_methods", "default_methods", "get", "make_options", "register"]
