"""The engine a study uses: the fast one where it is verified on the model, else the reference.

Each function here has the signature and returns the frame of its fast twin (`ioi.engines.fast`,
`ioi.engines.fast_paths`). It asks `ioi.engines.check.use_fast` first; on a model the fast engines
do not compute exactly (an unimplemented architecture feature, or logits that differ from the
model's), it runs the hook-based reference (`ioi.engines.hooks`, `ioi.engines.hooks_paths`)
instead, after one warning. The circuit criteria make the same choice in
`ioi.circuits.criteria.mean_ablation`.
"""

from __future__ import annotations

import pandas as pd

from ioi.engines import fast, fast_paths, hooks, hooks_paths
from ioi.engines.check import use_fast


def resid_named_frame(model, clean, corrupted, positions=("IO", "S1", "S1+1", "S2", "END")) -> pd.DataFrame:
    if use_fast(model, clean, corrupted):
        return fast.resid_named_frame(model, clean, corrupted, positions)
    frame = hooks.patch_residual(model, clean, corrupted, positions)
    return frame[["layer", "position", "logit_diff"]]


def layer_out_frame(model, clean, corrupted) -> pd.DataFrame:
    if use_fast(model, clean, corrupted):
        return fast.layer_out_frame(model, clean, corrupted)
    frames = [hooks.patch_layer_outputs(model, clean, corrupted, c) for c in ("attn", "mlp")]
    return pd.concat(frames, ignore_index=True)[["layer", "logit_diff", "component"]]


def head_out_frame(model, clean, corrupted, positions: fast.Positions = "all") -> pd.DataFrame:
    if use_fast(model, clean, corrupted):
        return fast.head_out_frame(model, clean, corrupted, positions)
    if positions == "all":
        frame = hooks.patch_head_outputs(model, clean, corrupted)
    else:
        frame = hooks.patch_head_outputs_by_position(model, clean, corrupted, positions=("END",))
    return frame[["layer", "head", "logit_diff"]]


def head_input_frame(model, clean, corrupted, heads: list[tuple[int, int]]) -> pd.DataFrame:
    if use_fast(model, clean, corrupted):
        return fast.head_input_frame(model, clean, corrupted, heads)
    sweeps = (hooks.patch_head_queries, hooks.patch_head_keys, hooks.patch_head_values, hooks.patch_head_patterns)
    frames = [sweep(model, clean, corrupted, heads=list(heads)) for sweep in sweeps]
    return pd.concat(frames, ignore_index=True)[["layer", "head", "logit_diff", "activation"]]


def path_patch_sweep(
    model, clean, corrupted, receivers="logits", receiver_input="q", receiver_position=None, first_layer: int = 0,
) -> pd.DataFrame:
    engine = fast_paths if use_fast(model, clean, corrupted) else hooks_paths
    return engine.path_patch_sweep(
        model, clean, corrupted, receivers, receiver_input, receiver_position, first_layer=first_layer
    )
