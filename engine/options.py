"""Validation helpers shared by the methods' options dataclasses and the facade's arguments: each
argument rule is written once, with a message that says what was wrong and what is allowed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def check_int(name: str, value, minimum: int | None = None) -> int:
    """`value` as an int: Python or numpy integers (not bools, not floats, even integral ones)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def normalize(options, name: str, value) -> None:
    """Store a checked value in a frozen options dataclass (numpy scalars become Python numbers, so
    the options compare, hash and serialize as the same options given as Python numbers)."""
    object.__setattr__(options, name, value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_k_values(k_values, n_tokens: int | None = None, fractions: bool = False) -> tuple:
    """k values as given: an int or a sequence of them, each >= 1 (and <= `n_tokens` when given); with
    `fractions`, also floats in (0, 1), a fraction of each text's tokens (`resolve_k`)."""
    allowed = "an int >= 1 or a fraction in (0, 1)" if fractions else "an int"
    if isinstance(k_values, numbers.Real) and not isinstance(k_values, bool):
        k_values = (k_values,)
    if isinstance(k_values, (str, bytes)) or not isinstance(k_values, Iterable):
        raise TypeError(f"k_values must be {allowed} or a sequence of them, got {k_values!r}")
    ks = tuple(k_values)
    if not ks:
        raise ValueError("k_values is empty: pass at least one k")
    out = []
    for k in ks:
        is_int = isinstance(k, numbers.Integral) and not isinstance(k, bool)
        is_fraction = fractions and isinstance(k, numbers.Real) and not is_int and not isinstance(k, bool)
        if not (is_int or is_fraction):
            raise TypeError(f"k must be {allowed}, got {k!r}")
        if is_fraction:
            if not 0 < k < 1:
                raise ValueError(f"a fractional k must be in (0, 1), got {k}")
            out.append(float(k))
        elif k < 1 or (n_tokens is not None and k > n_tokens):
            upper = f" and the number of tokens ({n_tokens})" if n_tokens is not None else ""
            raise ValueError(f"k must be between 1{upper}, got {k}" if upper else f"an int k must be >= 1, got {k}")
        else:
            out.append(int(k))
    return tuple(out)


def resolve_k(k, n_tokens: int) -> int:
    """An int k capped at the text's length, or a fraction of its tokens (rounded, at least 1)."""
    if not isinstance(k, numbers.Integral):
        return max(1, min(n_tokens, int(math.floor(k * n_tokens + 0.5))))
    return min(int(k), n_tokens)


def check_method_options(methods: list[str], options: dict[str, dict], action: str, name: str = "options") -> None:
    """At least one method, and per-method options (the argument `name`) only for methods in
    `methods`; `action` ("compared", "evaluated") says in the message what is done with them."""
    from .methods import available_methods

    if not methods:
        raise ValueError(f"methods must name at least one of {available_methods()}")
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise ValueError(f"{name} given for methods not {action}: {unknown}")
