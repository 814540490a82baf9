"""Exact activation patching, fast: recompute only what a patch can change.

Activation patching (Wang et al. 2022, §3; Meng et al. 2022) asks how much of a behaviour one
component carries: run the model on corrupted prompts, overwrite one component's activation with
its value from the clean run, and read the metric (here logit(IO) - logit(S) at END). Following
`transformer_lens.patching`, we patch CLEAN activations into the CORRUPTED run ("denoising") and
return the metric after each patch. Done naively that is one full forward per component: 144
forwards for GPT-2 small's heads, each paying for every layer, every position and a 50,257-wide
unembedding. Almost all of that work repeats the corrupted run. This module only does the rest:

1. The model as plain tensors. `FastModel` holds the weights the `TransformerBridge` exposes in
   compatibility mode (layer norms folded into the next linear map, writing weights and the
   unembedding centred, value biases folded into the output bias), so its forward is a handful of
   short functions: `embed`, `norm` (LayerNorm or RMSNorm without weights), `attention` (grouped
   query heads, rotary or learned positions) and `mlp` (GELU or SwiGLU). Gemma 3 is read from
   the Hugging Face model instead, with what no processing folds away: its norms' weights, the
   norms after attention and MLP, query/key norms and each layer's rotary table and window.
   It reproduces the bridge's logits to float rounding; `tests/test_fast.py` checks it against
   TransformerLens, and `ioi.engines.check` on every model before a study uses it.
2. One corrupted forward, cached. A patch at layer L leaves layers < L untouched, so every sweep
   starts from the cached corrupted residual stream at layer L.
3. Only the rows that change. A model is causal: a patch confined to positions >= p cannot change
   positions < p. `run_rows` therefore carries only the changed rows (a suffix of positions, or
   just END) through the later layers; they attend to the cached corrupted keys and values of all
   other positions, with the changed rows' own keys and values recomputed. Patching a head's
   output at END only needs one row per prompt; patching it at all positions needs the positions
   from the first token where the clean and corrupted prompts differ up to the last END.
4. Only the logits we read. The logit difference needs two columns of the unembedding,
   W_U[:, IO] - W_U[:, S], after the final norm, at END, never the whole vocabulary.
5. Many patches per forward. The variants of one layer (one per head, or per position) are
   stacked along the batch axis, since a few large matrix products beat many small ones on a CPU.

Every sweep returns the raw mean logit difference per component (`per_prompt=True` keeps the
prompt axis); normalise with `ioi.metrics.normalised`.

The package, in reading order: `model` (FastModel, Layer, the forward a function at a time, and
`block`, the one forward step, whose edit hook lets a patch, a mean-ablation or a gradient tap
change q, k, v, z or an output as it is computed; `run_with_cache` and `run_rows` loop it over
whole prompts or over the rows a patch changes), `loaders` (reading a bridge into a FastModel),
`reuse` (the cached clean and corrupted runs and the rows a patch changes) and `sweeps` (each
experiment a few lines over them). `ioi.engines.fast_paths` (the receivers' inputs as an edit),
`fast_ablation` (mean-ablation as an edit of z) and `attribution` (a gradient tap on every
activation) are edits of the same step.

Adding an architecture: teach `loaders` to read it, in one place: a `Loader` in `LOADERS` (a
new one beside Gemma 3's if its weights cannot come from the bridge's processed blocks) that
declares the features of `ioi.engines.check.FEATURES` it implements, with any new computation as a
field of `Layer` or `FastModel` that `block` applies. `ioi.engines.check` then lets those features
through for that loader's models and still refuses the rest by name. The shared `tiny_model`
fixture in tests/conftest.py runs it through every agreement test (against TransformerLens and
the hook references) once a tiny model of it is added there.
"""

__all__ = [  # what the other engines, the analyses and the tests use
    "as_fast", "from_bridge", "is_gemma3", "Cache", "FastModel", "Layer", "Positions", "attend", "attention_pattern",
    "attn_input", "block", "EDITABLE", "embed", "end_logit_diff", "head_out", "head_out_changes", "keys_values",
    "logit_diff_at", "logits", "mlp", "mlp_input", "norm", "queries", "rotate", "run_rows", "run_with_cache", "Task",
    "cached_runs", "first_change", "length_groups", "prepare", "reuse_last", "HeadInput", "HEAD_INPUTS",
    "head_input_patching", "head_input_sweep", "head_out_sweep", "head_patching", "layer_out_sweep",
    "layer_patching", "resid_named_sweep", "resid_sweep", "residual_patching", "_act", "_resid_mid_patched",
    "_resid_pre_patched",
]

from ioi.engines.fast.loaders import as_fast, from_bridge, is_gemma3
from ioi.engines.fast.model import (
    EDITABLE, Cache, FastModel, Layer, Positions, _act, attend, attention_pattern, attn_input, block, embed,
    end_logit_diff, head_out, head_out_changes, keys_values, logit_diff_at, logits, mlp, mlp_input, norm, queries,
    rotate, run_rows, run_with_cache,
)
from ioi.engines.fast.reuse import (
    Task, _resid_mid_patched, _resid_pre_patched, cached_runs, first_change, length_groups, prepare, reuse_last,
)
from ioi.engines.fast.sweeps import (
    HEAD_INPUTS, HeadInput, head_input_patching, head_input_sweep, head_out_sweep, head_patching,
    layer_out_sweep, layer_patching, resid_named_sweep, resid_sweep, residual_patching,
)
