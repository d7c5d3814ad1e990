"""The oracle: plain, one-text-at-a-time implementations of every method with the specification's
semantics, which every engine path and test is compared against. Imported by tests and benchmarks,
never by the runtime (`engine.runtime`, `engine.methods` only name their reference here, lazily).

`engine.reference.lrp` holds the explicit LRP oracle (the rules written out layer by layer)."""

from .methods import *  # noqa: F403
from .methods import _attentions  # noqa: F401
