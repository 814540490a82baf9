"""Activation patching (Wang et al. 2022 §3; Meng et al. 2022), written with hooks.

Run the model on the corrupted (ABC) prompts, and in one component at a time put back the
activation it had on the clean prompts. If the logit difference comes back, that component
carries information the task needs. We report the normalised metric: 0 is the corrupted run,
1 the clean run. This is the "denoising" direction that `transformer_lens.patching` uses, and the
results agree with it (tests/test_patching.py).

One generic mechanism, `patch_sweep`, takes a hook name per layer and a small "setter" that
writes the clean values into the corrupted activation for one index (a layer, a head, a
position). The public sweeps are thin wrappers. Positions are named per prompt ("S2", "END", ...)
because templates differ in length: "the S2 position" is a different index in each prompt.

These are the reference implementations, one forward pass per patched component. `ioi.engines.fast`
computes the head-output and residual sweeps much faster, and is tested against these.
"""

from __future__ import annotations

import itertools
from functools import partial
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ioi.dataset import IOIDataset
from ioi.metrics import logit_diff

Setter = Callable[[Tensor, Tensor, tuple, IOIDataset], Tensor]


# --- Caching ----------------------------------------------------------------------------------


@torch.inference_mode()
def run_with_cache(model, dataset: IOIDataset, names: Sequence[str] | Callable | None = None, fwd_hooks=()):
    """Logits and an activation cache for the dataset's tokens, keeping only `names` hooks.
    With `fwd_hooks` (an intervention such as an ablation), the run is edited by them and the
    cache holds what the edited run computed (each hook point after its edit)."""
    if not fwd_hooks:
        if names is not None and not callable(names):
            names = set(names).__contains__
        return model.run_with_cache(dataset.tokens, names_filter=names)
    if names is None or callable(names):
        raise ValueError("name the hook points to cache when the run is edited")
    cache = {}
    logits = model.run_with_hooks(dataset.tokens, fwd_hooks=list(fwd_hooks) + [(name, storer(cache, name)) for name in names])
    return logits, cache


def storer(cache: dict, name: str):
    """A hook that keeps its activation in `cache` under `name` (the name asked for: an alias
    such as blocks.0.hook_resid_pre reaches the hook under its canonical name)."""

    def store(act, hook):
        cache[name] = act.detach().clone()

    return store


def clean_and_corrupted(model, clean: IOIDataset, corrupted: IOIDataset, names=None) -> dict:
    """Both runs' mean logit differences and the clean cache, the inputs of every sweep."""
    clean_logits, clean_cache = run_with_cache(model, clean, names)
    with torch.inference_mode():
        corrupted_logits = model(corrupted.tokens)
    return {
        "clean_cache": clean_cache,
        "clean_ld": logit_diff(clean_logits, clean).mean().item(),
        "corrupted_ld": logit_diff(corrupted_logits, corrupted).mean().item(),
    }


# --- Setters: write the clean value into the corrupted activation at one index ------------------


def _rows(dataset: IOIDataset) -> Int[Tensor, " batch"]:
    return torch.arange(len(dataset))


def set_all(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """The whole activation (a layer's attention or MLP output, all positions)."""
    assert index == ()
    act[:] = clean
    return act


def set_position(act: Tensor, clean: Tensor, index: tuple, dataset: IOIDataset) -> Tensor:
    """One position of a [batch pos ...] activation; a name ("S2") or an absolute index."""
    (pos,) = index
    at = dataset.positions[pos] if isinstance(pos, str) else torch.full_like(dataset.end, pos)
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
    runs: dict | None = None,
) -> pd.DataFrame:
    """Patch each item (layer, *index) in turn; one row each with the mean logit difference and
    the normalised metric. `runs` (from `clean_and_corrupted`) may be passed to share a cache."""
    names = sorted({hook_name(item[0]) for item in items})
    runs = runs or clean_and_corrupted(model, clean, corrupted, names)
    rows = []
    for layer, *index in tqdm(items, desc=desc, leave=False):
        clean_act = runs["clean_cache"][hook_name(layer)]
        ld = patch_once(model, corrupted, hook_name(layer), clean_act, setter, tuple(index))
        rows.append({"layer": layer, **dict(zip(index_names, index)), "logit_diff": ld.mean().item()})
    out = pd.DataFrame(rows)
    out["patched_metric"] = (out.logit_diff - runs["corrupted_ld"]) / (runs["clean_ld"] - runs["corrupted_ld"])
    return out


def _every_layer(model, indices) -> list[tuple]:
    return [(layer, *index) for layer in range(model.cfg.n_layers) for index in indices]


# --- The public sweeps ----------------------------------------------------------------------


def patch_residual(model, clean, corrupted, positions=("IO", "S1", "S1+1", "S2", "END"), **kw):
    """The residual stream before each layer, at each named (or absolute) position."""
    return patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.hook_resid_pre", set_position,
        _every_layer(model, [(p,) for p in positions]), ["position"], "residual stream", **kw,
    )


def patch_layer_outputs(model, clean, corrupted, component: str = "attn", **kw):
    """A whole layer's attention output (`attn`) or MLP output (`mlp`), at every position."""
    hook = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}[component]
    out = patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.{hook}", set_all, _every_layer(model, [()]), [],
        f"{component} outputs", **kw,
    )
    return out.assign(component=component)


def _head_sweep(activation: str, model, clean, corrupted, heads=None, **kw):
    """Each head's `activation` at every position; `heads` (layer, head) limits the sweep."""
    n_heads = model.cfg.n_heads
    if activation in ("k", "v"):  # grouped-query attention has fewer key/value heads
        n_heads = getattr(model.cfg, "n_key_value_heads", None) or n_heads
        if heads is not None:
            heads = sorted({(l, h // (model.cfg.n_heads // n_heads)) for l, h in heads})
    setter = set_head_pattern if activation == "pattern" else set_head
    items = heads if heads is not None else _every_layer(model, [(h,) for h in range(n_heads)])
    out = patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.attn.hook_{activation}", setter,
        items, ["head"], f"head {activation}", **kw,
    )
    return out.assign(activation=activation)


patch_head_outputs = partial(_head_sweep, "z")
patch_head_queries = partial(_head_sweep, "q")
patch_head_keys = partial(_head_sweep, "k")
patch_head_values = partial(_head_sweep, "v")
patch_head_patterns = partial(_head_sweep, "pattern")


def patch_head_outputs_by_position(model, clean, corrupted, positions=("S1", "S1+1", "S2", "END"), **kw):
    """Each head's output at one named position at a time."""
    heads = range(model.cfg.n_heads)
    return patch_sweep(
        model, clean, corrupted, lambda l: f"blocks.{l}.attn.hook_z", set_head_position,
        _every_layer(model, list(itertools.product(heads, positions))), ["head", "position"],
        "heads by position", **kw,
    )
