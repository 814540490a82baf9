"""What the engines derive from one model, kept with that model for as long as it lives.

Two things are worth computing once per model: its `FastModel` (the weights read from the bridge,
whose `kept` holds a study's cached clean and corrupted runs) and `ioi.engines.check`'s verdicts
(one per pair of datasets, each a forward of both), with whether the fall-back warning was shown.
All are functions of the model's frozen weights, so they are kept on the model itself, in one
declared record, `EngineState`, and go when the model goes: a study that releases its model
(`Study.release_model`) frees its FastModel, cached runs and verdicts with its weights. A table
at module level would outlive the model, or need weak references to forget it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fast.loaders imports this module
    from ioi.engines.fast.model import FastModel

ATTRIBUTE = "ioi_engine_state"  # the one attribute the engines set on a model


@dataclass
class EngineState:
    fast: FastModel | None = None  # the model's FastModel, read on first use (`fast.as_fast`)
    verdicts: dict = field(default_factory=dict)  # (tolerance, datasets' digests) -> check.Verdict
    fallback_warned: bool = False  # `check.use_fast` warns once per model


def engine_state(model) -> EngineState:
    """The model's `EngineState`, made empty on first use."""
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = model.__dict__[ATTRIBUTE] = EngineState()
    return state
