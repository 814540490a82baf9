"""Activation patching (Wang et al. 2022 §3; Meng et al. 2022), written with hooks.

Run the model on the corrupted (ABC) prompts, and in one component at a time put back the
activation it had on the clean prompts. If the logit difference comes back, that component
carries information the task needs. This is the "denoising" direction that
`transformer_lens.patching` uses, and the results agree with it (tests/test_hooks.py); the study
reports them normalised, 0 the corrupted run and 1 the clean run (`Study._normalised`).

One generic mechanism, `patch_sweep`, takes a hook name per layer and a small "setter" that
writes the clean values into the corrupted activation for one index (a layer, a head, a
position). The experiments at the end are thin wrappers, with the names, arguments and output
columns of their fast twins in `ioi.engines.fast`, so that `ioi.engines.auto` only chooses.
Positions are named per prompt ("S2", "END", ...) because templates differ in length: "the S2
position" is a different index in each prompt.

These are the reference implementations, one forward pass per patched component. The fast
engines compute the same experiments much faster, and are tested against these.
"""

from __future__ import annotations

from functools import partial
from collections.abc import Callable, Sequence
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.dataset import POSITIONS, IOIDataset
from ioi.metrics import batches, end_logits, logit_diff, logit_diff_from_end, run_end_logits

Setter = Callable[[Tensor, Tensor, tuple, IOIDataset], Tensor]


# --- Caching ----------------------------------------------------------------------------------


# The hooks of an intervention (an ablation, a frozen path) for the prompts `rows` of a dataset:
# built per batch, so that an edited run is as bounded in memory as an unedited one.
Edit = Callable[[slice], Sequence[tuple[str, Callable]]]


@torch.inference_mode()
def run_with_cache(
    model, dataset: IOIDataset, names: Sequence[str] | Callable | None = None, edit: Edit | None = None
) -> tuple[Float[Tensor, "batch d_vocab"], dict]:
    """Logits at each prompt's END and an activation cache for the dataset's tokens, keeping
    only `names` hooks, the prompts run in `ioi.metrics.batches` of bounded memory. With `edit`,
    each batch runs with the hooks `edit(rows)` and the cache holds what the edited run computed
    (each hook point after its edit)."""
    if edit is not None and callable(names):
        raise ValueError("name the hook points to cache when the run is edited")
    wanted = [] if names is None or callable(names) else list(names)
    keep = names if names is None or callable(names) else set(wanted).__contains__
    ends, caches = [], []
    for rows in batches(model, dataset):
        if edit is None:
            logits, cache = model.run_with_cache(dataset.tokens[rows], names_filter=keep)
            cache = dict(cache.items())
        else:
            cache = {}
            logits = model.run_with_hooks(
                dataset.tokens[rows], fwd_hooks=list(edit(rows)) + [(name, storer(cache, name)) for name in wanted])
        ends.append(end_logits(logits, dataset.end[rows]))
        caches.append(cache)
        del logits, cache
    return torch.cat(ends), {name: torch.cat([c[name] for c in caches]) for name in caches[0]}


def storer(cache: dict, name: str):
    """A hook that keeps its activation in `cache` under `name` (the name asked for: an alias
    such as blocks.0.hook_resid_pre reaches the hook under its canonical name)."""

    def store(act, hook):
        cache[name] = act.detach().clone()

    return store


def clean_and_corrupted(model, clean: IOIDataset, corrupted: IOIDataset, names=None) -> dict:
    """Both runs' mean logit differences and the clean cache, the inputs of every sweep."""
    clean_logits, clean_cache = run_with_cache(model, clean, names)
    corrupted_logits = run_end_logits(model, corrupted)
    return {
        "clean_cache": clean_cache,
        "clean_ld": logit_diff_from_end(clean_logits, clean.io_token, clean.s_token).mean().item(),
        "corrupted_ld": logit_diff_from_end(corrupted_logits, corrupted.io_token, corrupted.s_token).mean().item(),
    }


# --- Setters: write the clean value into the corrupted activation at one index ------------------


def _rows(dataset: IOIDataset) -> Int[Tensor, " batch"]:
    return torch.arange(len(dataset))


def set_all(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """The whole activation (a layer's attention or MLP output, all positions)."""
    assert index == ()
    act[:] = clean
    return act


def position_index(dataset: IOIDataset, pos: str | int) -> Int[Tensor, " batch"]:
    """Each prompt's index of a named position ("S2"), or an absolute index for every prompt."""
    return dataset.positions[pos] if isinstance(pos, str) else torch.full_like(dataset.end, pos)


def set_position(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """One position of a [batch pos ...] activation; a name ("S2") or an absolute index."""
    (pos,) = index
    at = position_index(dataset, pos)
    rows = _rows(dataset)
    act[rows, at] = clean[rows, at]
    return act


def set_head(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """One head at every position of a [batch pos head d] activation (z, q, k, v)."""
    (head,) = index
    act[:, :, head] = clean[:, :, head]
    return act


def set_head_position(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """One head at one named position of a [batch pos head d] activation."""
    head, pos = index
    rows, at = _rows(dataset), dataset.positions[pos]
    act[rows, at, head] = clean[rows, at, head]
    return act


def set_head_pattern(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """One head's whole attention pattern, [batch head query key]."""
    (head,) = index
    act[:, head] = clean[:, head]
    return act


# --- The one generic mechanism -----------------------------------------------------------------


def patch_once(model, corrupted: IOIDataset, hook_name: str, clean_act: Tensor, setter: Setter, index: tuple) -> Float[Tensor, " batch"]:
    """Per-prompt logit difference of the corrupted run with one index patched to clean."""

    def hook(act, hook):
        return setter(act.clone(), clean_act, index, corrupted)

    with torch.inference_mode():
        logits = model.run_with_hooks(corrupted.tokens, fwd_hooks=[(hook_name, hook)])
    return logit_diff(logits, corrupted)


def patch_sweep(
    model,
    clean: IOIDataset,
    corrupted: IOIDataset,
    hook_name: Callable[[int], str],
    setter: Setter,
    items: Sequence[tuple],
    index_names: Sequence[str],
    desc: str = "patching",
) -> pd.DataFrame:
    """Patch each item (layer, *index) in turn: one row each, (layer, *index_names, logit_diff)
    with the mean logit difference of the patched run."""
    names = sorted({hook_name(item[0]) for item in items})
    _, clean_cache = run_with_cache(model, clean, names)
    rows = []
    for layer, *index in tqdm(items, desc=desc, leave=False):
        ld = patch_once(model, corrupted, hook_name(layer), clean_cache[hook_name(layer)], setter, tuple(index))
        rows.append({"layer": layer, **dict(zip(index_names, index)), "logit_diff": ld.mean().item()})
    return pd.DataFrame(rows, columns=["layer", *index_names, "logit_diff"])


def _every_layer(model, indices) -> list[tuple]:
    return [(layer, *index) for layer in range(model.cfg.n_layers) for index in indices]


# --- The experiments (the same names, arguments and columns as `ioi.engines.fast`'s) -----------



def residual_patching(model, clean, corrupted, positions: Sequence[str | int] = POSITIONS) -> pd.DataFrame:
    """The residual stream before each layer, at each named (or absolute) position:
    (layer, position, logit_diff)."""
    return patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.hook_resid_pre", set_position,
        _every_layer(model, [(p,) for p in positions]), ["position"], "residual stream",
    )


def layer_patching(model, clean, corrupted) -> pd.DataFrame:
    """Each layer's whole attention output, then each whole MLP output, at every position:
    (layer, component, logit_diff) with component "attn" or "mlp"."""
    frames = []
    for component in ("attn", "mlp"):
        frame = patch_sweep(
            model, clean, corrupted, lambda l: f"blocks.{l}.hook_{component}_out", set_all,
            _every_layer(model, [()]), [], f"{component} outputs",
        )
        frames.append(frame.assign(component=component)[["layer", "component", "logit_diff"]])
    return pd.concat(frames, ignore_index=True)


def head_patching(model, clean, corrupted, positions: Literal["all", "end"] = "all") -> pd.DataFrame:
    """Each head's output (`hook_z`) at every position or at each prompt's END only:
    (layer, head, logit_diff)."""
    setter = set_head if positions == "all" else partial(_at_end, set_head_position)
    return patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.attn.hook_z", setter,
        _every_layer(model, [(h,) for h in range(model.cfg.n_heads)]), ["head"], f"head outputs ({positions})",
    )


def _at_end(setter: Setter, act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    return setter(act, clean, (*index, "END"), dataset)


HEAD_INPUTS = ("q", "k", "v", "pattern")


def _n_kv_heads(cfg) -> int:
    """Key/value heads per layer: fewer than query heads under grouped-query attention."""
    return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads


def input_head(cfg, head: int, activation: str) -> int:
    """The head of its layer's `activation` that a query head reads: itself for q and pattern;
    under grouped-query attention, its group's key/value head for k and v."""
    if activation not in ("k", "v"):
        return head
    return head // (cfg.n_heads // _n_kv_heads(cfg))


def head_input_items(cfg, heads: Sequence[tuple[int, int]] | None, activation: str) -> list[tuple[int, int]]:
    """The (layer, head) items one input of `heads` is patched at (None: every head): query
    heads for q and pattern, key/value heads for k and v, each group once."""
    if heads is None:
        n = _n_kv_heads(cfg) if activation in ("k", "v") else cfg.n_heads
        return [(l, h) for l in range(cfg.n_layers) for h in range(n)]
    if activation in ("k", "v"):
        return sorted({(l, input_head(cfg, h, activation)) for l, h in heads})
    return [(int(l), int(h)) for l, h in heads]


def head_input_patching(
    model, clean, corrupted, heads: Sequence[tuple[int, int]] | None = None, activations: Sequence[str] = HEAD_INPUTS,
) -> pd.DataFrame:
    """Each of `heads`' (layer, query head; None: every head) queries, keys, values and attention
    pattern at every position, one at a time: (layer, head, activation, logit_diff). Keys and
    values are reported per key/value head, once per group: under grouped-query attention
    patching one changes every query head of its group."""
    frames = []
    for activation in activations:
        items = head_input_items(model.cfg, heads, activation)
        frame = patch_sweep(
            model, clean, corrupted, lambda l: f"blocks.{l}.attn.hook_{activation}",
            set_head_pattern if activation == "pattern" else set_head, items, ["head"], f"head {activation}",
        )
        frames.append(frame.assign(activation=activation)[["layer", "head", "activation", "logit_diff"]])
    return pd.concat(frames, ignore_index=True)
