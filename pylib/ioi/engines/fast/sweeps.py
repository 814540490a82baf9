"""The sweeps: every head, layer or position patched in turn, each a few lines over `reuse`."""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.dataset import POSITIONS
from ioi.engines.hooks import HEAD_INPUTS, head_input_items, position_index
from ioi.engines.fast.model import (
    Positions, attend, attention_pattern, attn_input, head_out, head_out_changes, queries,
)
from ioi.engines.fast.reuse import (
    Task, _chunks, _resid_mid_patched, _resid_pre_patched, _unpatched, length_groups, prepare,
)

@torch.inference_mode()
def head_out_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    positions: Positions = "all",
    batch_size: int = 512,
    per_prompt: bool = False,
) -> Float[Tensor, "layer head *batch"]:
    """Logit difference at END after patching each head's clean output (`hook_z`) into the
    corrupted run, at all positions (as TransformerLens's `get_act_patch_attn_head_out_all_pos`)
    or at each prompt's own END only. `batch_size` bounds the patched prompts run at once."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast = task.fast
    out = torch.empty(fast.n_layers, fast.n_heads, task.batch, dtype=fast.W_E.dtype)
    # END-only patches change one row per prompt, whatever its length: no need to group.
    groups = [torch.arange(task.batch)] if positions == "end" else length_groups(task.end)
    for prompts in groups:
        start = None if positions == "end" else task.first_change(prompts)
        heads_per_chunk = max(1, batch_size // len(prompts))
        for i, layer in enumerate(fast.layers):
            dz = task.clean.z[i][prompts] - task.corrupted.z[i][prompts]  # [batch pos head d_head]
            for heads in _chunks(fast.n_heads, heads_per_chunk):
                # patching a head's z adds (clean z - corrupted z) @ W_O to the attention output
                deltas = head_out_changes(fast, layer, task.corrupted.z[i][prompts], dz, heads)
                out[i, heads][:, prompts] = _resid_mid_patched(task, i, prompts, deltas, start)
    return out if per_prompt else out.mean(-1)


@torch.inference_mode()
def resid_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    component: Literal["resid_pre", "attn_out", "mlp_out"] = "resid_pre",
    per_prompt: bool = False,
) -> Float[Tensor, "layer pos *batch"]:
    """Logit difference at END after patching a clean activation into the corrupted run at one
    absolute position, per layer: the residual stream before the layer (`resid_pre`, as
    TransformerLens's `get_act_patch_resid_pre`), or the layer's `attn_out` or `mlp_out`
    (`get_act_patch_attn_out`, `get_act_patch_mlp_out`)."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast, everyone = task.fast, torch.arange(task.batch)
    out = torch.empty(fast.n_layers, task.n_pos, task.batch, dtype=fast.W_E.dtype)
    # Patches before the first difference or after the last END change nothing we read.
    out[:] = _unpatched(task)
    for i in range(fast.n_layers):
        for p in range(task.first_change(everyone), int(task.end.max()) + 1):
            out[i, p] = _position_patch(task, component, i, p)[0]
    return out if per_prompt else out.mean(-1)


def _position_patch(task: Task, component: str, layer: int, p: int) -> Float[Tensor, "1 batch"]:
    """One layer's clean `component` patched in at position p, all prompts at once."""
    everyone = torch.arange(task.batch)
    clean, corrupted = task.clean, task.corrupted
    if component == "resid_pre":
        patched = corrupted.resid_pre[layer].clone()
        patched[:, p] = clean.resid_pre[layer][:, p]
        return _resid_pre_patched(task, layer, everyone, patched[None], p)
    diff = torch.zeros_like(corrupted.resid_pre[layer])
    at = (slice(None), slice(p, p + 1))
    diff[at] = getattr(clean, component)(layer, at) - getattr(corrupted, component)(layer, at)
    if component == "attn_out":
        return _resid_mid_patched(task, layer, everyone, diff[None], p)
    # an MLP-output patch is a change to the residual stream before the next layer
    after = corrupted.resid_pre[layer + 1] if layer + 1 < task.fast.n_layers else corrupted.resid_final
    return _resid_pre_patched(task, layer + 1, everyone, (after + diff)[None], p)


@torch.inference_mode()
def layer_out_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    component: Literal["attn_out", "mlp_out"] = "attn_out",
    per_prompt: bool = False,
) -> Float[Tensor, "layer *batch"]:
    """Logit difference at END after patching a whole layer's clean attention or MLP output
    into the corrupted run at every position (as `ioi.engines.hooks.layer_patching`)."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast, clean, corrupted = task.fast, task.clean, task.corrupted
    out = torch.empty(fast.n_layers, task.batch, dtype=fast.W_E.dtype)
    for prompts in length_groups(task.end):
        start = task.first_change(prompts)
        for i in range(fast.n_layers):
            diff = getattr(clean, component)(i, prompts) - getattr(corrupted, component)(i, prompts)
            if component == "attn_out":
                out[i, prompts] = _resid_mid_patched(task, i, prompts, diff[None], start)[0]
            else:  # an MLP output patch changes the residual stream before the next layer
                after = corrupted.resid_pre[i + 1] if i + 1 < fast.n_layers else corrupted.resid_final
                out[i, prompts] = _resid_pre_patched(task, i + 1, prompts, (after[prompts] + diff)[None], start)[0]
    return out if per_prompt else out.mean(-1)


HeadInput = Literal["q", "k", "v", "pattern"]


@torch.inference_mode()
def head_input_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    activation: HeadInput,
    heads: list[tuple[int, int]],
    per_prompt: bool = False,
) -> Float[Tensor, "item *batch"]:
    """Logit difference at END after patching one head's clean queries, keys, values or
    attention pattern into the corrupted run at every position, for each (layer, head) in
    `heads` (as `ioi.engines.hooks.head_input_patching`). Keys and values are indexed by key/value
    head: under grouped-query attention patching one changes every query head of its group."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast = task.fast
    out = torch.empty(len(heads), task.batch, dtype=fast.W_E.dtype)
    for prompts in length_groups(task.end):
        start = task.first_change(prompts)
        for j, (i, head) in enumerate(heads):
            z = _attention_with_clean(task, i, prompts, activation, head)
            delta = head_out(fast, fast.layers[i], z) - head_out(fast, fast.layers[i], task.corrupted.z[i][prompts])
            out[j, prompts] = _resid_mid_patched(task, i, prompts, delta[None], start)[0]
    return out if per_prompt else out.mean(-1)


def _attention_with_clean(task: Task, i: int, prompts: Tensor, activation: HeadInput, head: int):
    """Layer i's head outputs on the corrupted prompts with one head's `activation` clean."""
    fast, layer = task.fast, task.fast.layers[i]
    pos = torch.arange(task.n_pos).expand(len(prompts), -1)
    runs = {}
    for name, cache in (("clean", task.clean), ("corrupted", task.corrupted)):
        x = attn_input(fast, layer, cache.resid_pre[i][prompts])
        runs[name] = {"q": queries(fast, layer, x, pos), "k": cache.k[i][prompts], "v": cache.v[i][prompts]}
    q, k, v = (runs["corrupted"][name].clone() for name in ("q", "k", "v"))
    if activation == "pattern":
        pattern = attention_pattern(fast, layer, q, k, pos)
        pattern[:, head] = attention_pattern(fast, layer, runs["clean"]["q"], runs["clean"]["k"], pos)[:, head]
        return attend(pattern, v)
    patched = {"q": q, "k": k, "v": v}[activation]
    patched[:, :, head] = runs["clean"][activation][:, :, head]
    return attend(attention_pattern(fast, layer, q, k, pos), v)


@torch.inference_mode()
def resid_named_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    positions: Int[Tensor, "name batch"],
    per_prompt: bool = False,
) -> Float[Tensor, "layer name *batch"]:
    """Logit difference at END after patching the clean residual stream before each layer into
    the corrupted run at each prompt's own position `positions[name, prompt]` (its S2, its END,
    ..., or an absolute position, after END in a shorter prompt). Rows are carried from the earliest of those positions, so a late position (END) costs
    a fraction of an early one."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    out = torch.empty(task.fast.n_layers, len(positions), task.batch, dtype=task.fast.W_E.dtype)
    unpatched = _unpatched(task)
    for prompts in length_groups(task.end):  # so that a patch at END carries END alone
        rows = torch.arange(len(prompts))
        for i, at in enumerate(positions[:, prompts]):
            beyond = at > task.end[prompts]  # an absolute position after END changes nothing read there
            at = torch.minimum(at, task.end[prompts])
            for layer in range(task.fast.n_layers):
                patched = task.corrupted.resid_pre[layer][prompts]
                patched[rows, at] = task.clean.resid_pre[layer][prompts, at]
                value = _resid_pre_patched(task, layer, prompts, patched[None], int(at.min()))[0]
                out[layer, i, prompts] = torch.where(beyond, unpatched[prompts], value)
    return out if per_prompt else out.mean(-1)


# --- The experiments: the names, arguments and columns of `ioi.engines.hooks`' references ------

def _args(clean, corrupted) -> tuple:
    return (clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)


def residual_patching(model, clean, corrupted, positions=POSITIONS) -> pd.DataFrame:
    """`resid_named_sweep` at each prompt's named (or an absolute) position:
    (layer, position, logit_diff)."""
    at = torch.stack([position_index(clean, p) for p in positions])
    values = resid_named_sweep(model, *_args(clean, corrupted), at)
    return pd.DataFrame(
        [{"layer": layer, "position": p, "logit_diff": values[layer, i].item()}
         for layer in range(values.shape[0]) for i, p in enumerate(positions)]
    )


def layer_patching(model, clean, corrupted) -> pd.DataFrame:
    """`layer_out_sweep` of attention then MLP outputs: (layer, component, logit_diff)."""
    frames = []
    for component in ("attn", "mlp"):
        values = layer_out_sweep(model, *_args(clean, corrupted), component=f"{component}_out")
        frames.append(pd.DataFrame({"layer": range(len(values)), "component": component,
                                    "logit_diff": values.double().numpy()}))
    return pd.concat(frames, ignore_index=True)


def head_patching(model, clean, corrupted, positions: Positions = "all") -> pd.DataFrame:
    """`head_out_sweep`: (layer, head, logit_diff)."""
    values = head_out_sweep(model, *_args(clean, corrupted), positions=positions)
    layers, heads = torch.meshgrid(torch.arange(values.shape[0]), torch.arange(values.shape[1]), indexing="ij")
    return pd.DataFrame({"layer": layers.flatten().numpy(), "head": heads.flatten().numpy(),
                         "logit_diff": values.flatten().double().numpy()})


def head_input_patching(model, clean, corrupted, heads=None, activations=HEAD_INPUTS) -> pd.DataFrame:
    """`head_input_sweep` of `heads`' (layer, query head; None: every head) inputs:
    (layer, head, activation, logit_diff), keys and values per key/value head, once per group."""
    frames = []
    for activation in activations:
        items = head_input_items(model.cfg, heads, activation)
        values = head_input_sweep(model, *_args(clean, corrupted), activation=activation, heads=items)
        frames.append(pd.DataFrame({"layer": [l for l, _ in items], "head": [h for _, h in items],
                                    "activation": activation, "logit_diff": values.double().numpy()}))
    return pd.concat(frames, ignore_index=True)
