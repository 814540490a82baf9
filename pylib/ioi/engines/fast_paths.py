"""Exact path patching, fast: the sweep of `ioi.engines.hooks_paths.path_patching` without hooks.

`ioi.engines.hooks_paths` runs, per sender head, two or three full hooked forwards of the bridge. Most
of that work repeats the clean run. This module computes the same numbers from one clean and
one corrupted cached forward of `ioi.engines.fast.FastModel`, and only the rows that can change.

Why it is exact
---------------
Step 2 (senders from the corrupted run, every other head frozen to its clean `hook_z`). Every
attention layer's output is a function of its heads' z only (attn_out = sum_h z_h W_O[h] + b_O,
then Gemma 3's post-attention norm), so with every z fixed each attention layer outputs exactly
its clean value, except the sender's layer L, whose output changes by (corrupted z - clean
z)[sender] @ W_O[sender] (recomputed through the norm where there is one), position by
position. The only other components are MLPs and norms, which act on each position alone. So no
information moves between positions in step 2, and the residual stream at a position p is

    resid_mid[L] = clean resid_mid[L][p] + delta[p]
    then, per layer: resid += mlp(norm(resid)); resid += clean attn_out[l+1][p]; ...

computed from the clean cache at p alone. For receivers "logits" step 2 is the answer: only the
END row is needed, and the logit difference needs two unembedding columns (`logit_diff_at`).

Step 3 (only the receivers' q/k/v replaced by their step-2 values at the patched positions,
everything else recomputed on the clean prompts). Before the first receiver layer R0 nothing
changes, so step 3 starts from the clean resid_pre[R0]. A patch at positions >= s can only change
rows >= s (causality): a patched query at X changes row X; a patched key/value at X changes every
row that attends to X, i.e. rows >= X, and those rows' outputs then change later layers' keys and
values. So only the rows from the earliest patched position to the last END are carried through
the layers (only END itself when the query is patched at END); they attend to the clean cached
keys and values everywhere else, with their own recomputed keys and values written over them.
The receivers' step-2 inputs are computed from step 2's residual stream at the patched positions
(a query or key is rotated at its own position, so patching before or after rotary agrees).
Under grouped-query attention receivers' k/v are patched on their key/value head
h // (n_heads / n_kv_heads), which every query head of the group reads, as in the reference.

Fast cases: every receivers ("logits", or (layer, head) lists with input "q", "k" or "v" at a named
position such as "END" or "S2", or at all positions, None). With None the rows carried start at
the first position where a clean and a corrupted prompt differ: before it the step-2 inputs equal
the clean ones. Anything else (another receiver_input) falls back to the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi.engines import hooks_paths
from ioi.dataset import IOIDataset
from ioi.engines.fast import (
    Cache, FastModel, as_fast, attn_input, cached_runs, first_change, head_out_changes, keys_values, length_groups,
    logit_diff_at, mlp, mlp_input, queries, run_rows,
)

Head = tuple[int, int]  # (layer, head)
COLUMNS = ["layer", "head", "logit_diff", "relative_change"]


def empty_sweep() -> pd.DataFrame:
    """A sweep with no senders (receivers in layer 0, or none), typed like a full one."""
    return pd.DataFrame({"layer": pd.Series(dtype=int), "head": pd.Series(dtype=int),
                         "logit_diff": pd.Series(dtype=float), "relative_change": pd.Series(dtype=float)})


def path_patching(
    model,
    clean: IOIDataset,
    corrupted: IOIDataset,
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "q",
    receiver_position: str | None = None,
    batch_size: int = 512,
    first_layer: int = 0,
) -> pd.DataFrame:
    """`ioi.engines.hooks_paths.path_patching`, exactly (to float rounding), from cached forwards.

    Each head in layers before every receiver in turn as the single sender; one row per sender
    (layer, head, mean logit difference, change relative to the clean run). `batch_size` bounds
    the (sender x prompt) variants run at once. Fast for receivers "logits" and for (layer, head)
    receivers with receiver_input "q", "k" or "v" at any named position or at all positions
    (None); any other receiver_input falls back to the hook-based reference. Senders in layers
    below `first_layer` are skipped (no row), for sweeps that only need the later ones."""
    if receivers != "logits" and not receivers:
        return empty_sweep()
    if receivers != "logits" and receiver_input not in ("q", "k", "v"):
        return hooks_paths.path_patching(
            model, clean, corrupted, receivers, receiver_input, receiver_position, first_layer
        )
    fast = as_fast(model)
    receivers = receivers if receivers == "logits" else [(int(l), int(h)) for l, h in receivers]
    last = fast.n_layers if receivers == "logits" else min(l for l, _ in receivers)
    if last <= first_layer:  # no sender lies before the receivers
        return empty_sweep()
    clean_cache, corrupted_cache = cached_runs(fast, clean.tokens, corrupted.tokens)
    with torch.inference_mode():
        at_end = clean_cache.resid_final[torch.arange(len(clean)), clean.end]
        clean_ld = logit_diff_at(fast, at_end, clean.io_token, clean.s_token).mean().item()
        values = _sweep(
            fast, clean, corrupted, clean_cache, corrupted_cache, receivers, receiver_input,
            receiver_position, last, batch_size, first_layer,
        )
    rows = [
        {"layer": l, "head": h, "logit_diff": values[l, h].item()}
        for l in range(first_layer, last)
        for h in range(fast.n_heads)
    ]
    out = pd.DataFrame(rows)
    out["relative_change"] = (out.logit_diff - clean_ld) / clean_ld
    return out


def _sweep(
    fast: FastModel,
    clean: IOIDataset,
    corrupted: IOIDataset,
    clean_cache: Cache,
    corrupted_cache: Cache,
    receivers,
    receiver_input: str,
    receiver_position: str | None,
    last: int,
    batch_size: int,
    first_layer: int = 0,
) -> Float[Tensor, "layer head"]:
    """Mean logit difference per sender head, for senders in layers first_layer..last-1 (rows
    below first_layer are left zero)."""
    batch, n_heads = len(clean), fast.n_heads
    end = clean.end
    if receivers == "logits":
        positions = end
    else:
        positions = None if receiver_position is None else clean.positions[receiver_position]
    end_only = receivers == "logits" or (receiver_input == "q" and positions is not None and torch.equal(positions, end))
    # Step 3 carries rows from the earliest patched position (or first difference) to END:
    # prompts of one length at a time, so that no row is spent on padding. END-only patches
    # carry one row per prompt whatever its length.
    groups = [torch.arange(batch)] if end_only else length_groups(end)
    out = torch.zeros(last, n_heads, dtype=fast.W_E.dtype)
    for group in groups:
        if end_only:
            start = None
        elif positions is None:
            start = first_change(clean.tokens[group], corrupted.tokens[group], end[group])
        else:
            start = int(positions[group].min())
        out += _sweep_prompts(
            fast, clean, clean_cache, corrupted_cache, receivers, receiver_input, positions, start, last,
            group, batch_size, first_layer,
        ) * len(group) / batch
    return out


def _sweep_prompts(
    fast: FastModel,
    clean: IOIDataset,
    clean_cache: Cache,
    corrupted_cache: Cache,
    receivers,
    receiver_input: str,
    positions: Int[Tensor, " batch"] | None,
    start: int | None,
    last: int,
    prompts: Int[Tensor, " prompts"],
    batch_size: int,
    first_layer: int = 0,
) -> Float[Tensor, "layer head"]:
    """`_sweep` on some of the prompts, carrying rows from `start` to their END in step 3 (END
    alone when start is None)."""
    n_heads, end = fast.n_heads, clean.end
    out = torch.zeros(last, n_heads, dtype=fast.W_E.dtype)
    heads_per_chunk = max(1, batch_size // len(prompts))
    for layer in range(first_layer, last):
        for first in range(0, n_heads, heads_per_chunk):
            heads = torch.arange(first, min(n_heads, first + heads_per_chunk))
            prompt = prompts.repeat(len(heads))
            if start is None:
                pos, end_row = end[prompt][:, None], torch.zeros_like(prompt)
            else:
                pos = torch.arange(start, int(end[prompts].max()) + 1).expand(len(prompt), -1)
                end_row = end[prompt] - start
            # Step 2, position-wise: only the patched positions (one row per variant, or every
            # carried row when patching at all positions). The sender's change to its layer's
            # output, then the frozen forward.
            pos2 = pos if positions is None else positions[prompt][:, None]
            rows = prompt[:, None], pos2
            # the variants are the chunk's heads, each over every prompt: head-major
            at = prompts[:, None], pos2[: len(prompts)]
            z = clean_cache.z[layer][at]
            changes = head_out_changes(fast, fast.layers[layer], z, corrupted_cache.z[layer][at] - z, slice(first, first + len(heads)))
            resid_mid = clean_cache.resid_mid(layer, rows) + changes.flatten(0, 1)
            if receivers == "logits":  # pos2 is END
                resid = _frozen_forward(fast, clean_cache, layer, resid_mid, prompt, pos2, [fast.n_layers])
                resid = resid[fast.n_layers][:, 0]
            else:
                layers = sorted({l for l, _ in receivers})
                step2 = _frozen_forward(fast, clean_cache, layer, resid_mid, prompt, pos2, layers)
                patches = {
                    l: _receiver_inputs(fast, l, step2[l], pos2, receiver_input, [h for rl, h in receivers if rl == l])
                    for l in layers
                }
                # Step 3: the clean run from the first receiver layer on, for the rows `pos`
                # alone (all that the patch can change), the receivers' inputs from step 2
                resid = run_rows(
                    fast, clean_cache, layers[0], clean_cache.resid_pre[layers[0]][prompt[:, None], pos], prompt, pos,
                    end_row, after_attention=False,
                    edit=_receiver_patch(receiver_input, patches, int(pos[0, 0]), None if positions is None else positions[prompt]),
                )
            ld = logit_diff_at(fast, resid, clean.io_token[prompt], clean.s_token[prompt])
            out[layer, heads] = ld.view(len(heads), len(prompts)).mean(-1)
    return out


def _frozen_forward(
    fast: FastModel,
    cache: Cache,
    layer: int,
    resid_mid: Float[Tensor, "n row d_model"],
    prompt: Int[Tensor, " n"],
    pos: Int[Tensor, "n row"],
    want: list[int],
) -> dict[int, Tensor]:
    """Step 2 from `layer`'s residual after attention, every later attention layer frozen to its
    clean output: the residual stream before each layer in `want` (n_layers: the final one)."""
    out = {}
    # the sender changed the attention output only: a parallel MLP reads the cached residual
    pre = cache.resid_pre[layer][prompt[:, None], pos] if fast.parallel else resid_mid
    resid = resid_mid + mlp(fast, fast.layers[layer], mlp_input(fast, fast.layers[layer], pre, resid_mid))
    for l in range(layer + 1, max(want) + 1):
        if l in want:
            out[l] = resid
        if l == fast.n_layers or l == max(want):
            break
        pre, resid = resid, resid + cache.attn_out(l, (prompt[:, None], pos))
        resid = resid + mlp(fast, fast.layers[l], mlp_input(fast, fast.layers[l], pre, resid))
    return out


def _receiver_inputs(
    fast: FastModel,
    layer: int,
    resid_pre: Float[Tensor, "n row d_model"],
    pos: Int[Tensor, "n row"],
    receiver_input: str,
    heads: list[int],
) -> tuple[Float[Tensor, "n row head d_head"], Bool[Tensor, " head"]]:
    """Step 2's q (rotated), k (rotated) or v of the layer, and which of its heads (query heads
    for q, key/value heads for k and v) are the receivers'."""
    lw = fast.layers[layer]
    x = attn_input(fast, lw, resid_pre)
    if receiver_input == "q":
        value = queries(fast, lw, x, pos)
        group = 1
    else:
        value = keys_values(fast, lw, x, pos)[0 if receiver_input == "k" else 1]
        group = lw.W_Q.shape[0] // lw.W_K.shape[0]
    chosen = torch.zeros(value.shape[2], dtype=torch.bool)
    chosen[[h // group for h in heads]] = True
    return value, chosen


def _receiver_patch(receiver_input: str, patches: dict, first: int, patch_pos: Int[Tensor, " n"] | None):
    """A `block` edit that gives the receivers step 2's `receiver_input` ("q", "k" or "v"):
    `patches[layer]` is (step 2's value, which of the layer's heads are receivers), the value
    either for every carried row from position `first` on (`patch_pos` None: all positions) or
    for each item's one patched position `patch_pos`, broadcast over its rows."""

    def patch(name, layer, value, prompt, pos):
        if name != receiver_input or layer not in patches:
            return value
        new, chosen = patches[layer]
        if new.shape[1] > 1:  # one value per carried row: those of the rows at hand
            new = new[torch.arange(len(pos), device=pos.device)[:, None], pos - first]
        where = chosen[None, None] if patch_pos is None else (pos == patch_pos[:, None])[:, :, None] & chosen[None, None]
        return torch.where(where[..., None], new, value)

    return patch
