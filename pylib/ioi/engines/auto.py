"""The engine a study uses: the fast one where it is verified on the model, else the reference.

Each experiment has one name, one signature and one output frame in both engines
(`ioi.engines.fast` and `ioi.engines.hooks`; `ioi.engines.fast_paths` and
`ioi.engines.hooks_paths` for path patching), so this module only chooses: it asks
`ioi.engines.check.use_fast` and, on a model the fast engines do not compute exactly (an
unimplemented architecture feature, or logits that differ from the model's), runs the hook-based
reference instead, after one warning. The circuit criteria make the same choice in
`ioi.circuits.criteria.mean_ablation`.
"""

from __future__ import annotations

import pandas as pd

from ioi.dataset import POSITIONS
from ioi.engines import fast, fast_paths, hooks, hooks_paths
from ioi.engines.check import use_fast


def residual_patching(model, clean, corrupted, positions=POSITIONS) -> pd.DataFrame:
    """(layer, position, logit_diff): the residual stream before each layer at each position."""
    engine = fast if use_fast(model, clean, corrupted) else hooks
    return engine.residual_patching(model, clean, corrupted, positions)


def layer_patching(model, clean, corrupted) -> pd.DataFrame:
    """(layer, component, logit_diff): each layer's whole attention, then MLP, output."""
    engine = fast if use_fast(model, clean, corrupted) else hooks
    return engine.layer_patching(model, clean, corrupted)


def head_patching(model, clean, corrupted, positions: fast.Positions = "all") -> pd.DataFrame:
    """(layer, head, logit_diff): each head's output at every position or at END."""
    engine = fast if use_fast(model, clean, corrupted) else hooks
    return engine.head_patching(model, clean, corrupted, positions)


def head_input_patching(model, clean, corrupted, heads=None, activations=fast.HEAD_INPUTS) -> pd.DataFrame:
    """(layer, head, activation, logit_diff): each head's queries, keys, values and pattern."""
    engine = fast if use_fast(model, clean, corrupted) else hooks
    return engine.head_input_patching(model, clean, corrupted, heads, activations)


def path_patching(
    model, clean, corrupted, receivers="logits", receiver_input="q", receiver_position=None, first_layer: int = 0,
) -> pd.DataFrame:
    """Every head before the receivers as the sender of one path patch (`hooks_paths`)."""
    engine = fast_paths if use_fast(model, clean, corrupted) else hooks_paths
    return engine.path_patching(model, clean, corrupted, receivers, receiver_input, receiver_position, first_layer=first_layer)
