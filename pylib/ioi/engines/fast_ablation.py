"""Mean-ablation runs, fast: a circuit and many of its knockouts from one cached run.

The paper's circuit criteria (`ioi.circuits.criteria`) run the model with every head outside a circuit
replaced by its mean output over the ABC prompts of the same template (mean-ablation), then
again with a few more heads removed: completeness needs |C| such knockouts per greedy step,
minimality about 2|C|. Naively each is a full hooked forward. Here each is as short as it can
be while staying exact:

1. The base run, cached. Knockouts of a circuit C (or of the whole model M) differ from C's own
   run only from the first layer where their kept heads differ: every layer before it computes
   exactly what C's run computed. So C's run is done once with `fast.run_with_cache`, and each
   knockout starts from its cached residual stream at that layer (`start_layer`).
2. Only the positions that can change. Where every ABC prompt of a prompt's group has the same
   tokens as the prompt (the template's opening words, before the first name), a head's group
   mean is its own output, so ablating it there changes nothing and nothing there ever differs
   from the clean run. Knockouts carry only the rows from the first position where that fails
   to END, prompts of one length at a time (`length_groups`), attending to the cached keys and
   values before it; the last layer runs on END alone, and only the two unembedding columns of
   logit(IO) - logit(S) are read.
3. Knockouts that start at the same layer are stacked along the batch axis, up to `batch_size`
   prompt-variants at once: it helps when there are few prompts, and costs nothing otherwise.

Where even that is too many runs (the greedy completeness search tries every head of a large
circuit at every step), `knockout_estimates` gives every single-head knockout's effect to first
order from one forward and one backward pass, as attribution patching does for patches, so that
only the most promising candidates need an exact run.

`tests/test_fast_ablation.py` checks every result against the hook-based `ioi.circuits.criteria.run_circuit`
on GPT-2- and Llama-shaped models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi.engines.fast import (
    Cache, FastModel, as_fast, length_groups, logit_diff_at, reuse_last, run_rows, run_with_cache,
)

Keep = Bool[Tensor, "layer batch pos head"]  # True where a head's own output is kept


@dataclass(frozen=True)
class MeanAblation:
    """Prompts, the mean each head's output is replaced by, and where a replacement can matter."""

    fast: FastModel
    tokens: Int[Tensor, "batch pos"]
    end: Int[Tensor, " batch"]
    io_token: Int[Tensor, " batch"]
    s_token: Int[Tensor, " batch"]
    mean_z: tuple[Float[Tensor, "batch pos head d_head"], ...]  # per layer: each prompt's group mean
    # Prompts of one length (one END), and the position before which every ablated run of them
    # equals the clean run: knockouts carry only the rows between the two.
    length_groups: tuple[tuple[Int[Tensor, " _prompts"], int], ...]


@torch.inference_mode()
def prepare(
    model_or_fast,
    tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    reference_tokens: Int[Tensor, "batch pos"],
    groups: Int[Tensor, " batch"],
) -> MeanAblation:
    """Means of every head's output (z) over the reference (ABC) prompts of each group; prompt b
    of `tokens` takes the mean of group groups[b] (reference prompt b is its own corruption)."""
    fast = as_fast(model_or_fast)
    if tokens.shape != reference_tokens.shape or len(groups) != len(tokens):
        raise ValueError("the prompts, their reference prompts and their groups must be aligned one to one")
    by_length = tuple(
        (prompts, _first_change(tokens[prompts], reference_tokens[prompts], groups[prompts], int(end[prompts[0]])))
        for prompts in length_groups(end)
    )
    return MeanAblation(fast, tokens, end, io_token, s_token, group_means(fast, reference_tokens, groups), by_length)


def prepare_resampled(
    model_or_fast,
    tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    reference_tokens: Int[Tensor, "batch pos"],
) -> MeanAblation:
    """Resample-ablation: each prompt takes its own reference (ABC) prompt's head outputs, not a
    mean over a group. That is exactly `prepare` with every prompt its own group (a mean over one
    prompt is that prompt's value), so every engine above runs it unchanged, and each prompt's
    rows start where it differs from its own counterpart. `ioi.circuits.criteria.resampled_values`
    is the hook-based reference."""
    return prepare(model_or_fast, tokens, end, io_token, s_token, reference_tokens, torch.arange(len(tokens)))


@reuse_last  # faithfulness, completeness and minimality of one study share them
@torch.inference_mode()
def group_means(
    fast: FastModel, reference_tokens: Int[Tensor, "batch pos"], groups: Int[Tensor, " batch"]
) -> tuple[Float[Tensor, "batch pos head d_head"], ...]:
    """Per layer, each head's output (z) averaged over the reference prompts of each group, as
    the mean for every prompt of the group."""
    n_groups = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=n_groups).to(fast.W_E.dtype)
    means = []
    for z in run_with_cache(fast, reference_tokens).z:
        sums = torch.zeros(n_groups, *z.shape[1:], dtype=z.dtype).index_add_(0, groups, z)
        means.append((sums / counts[:, None, None, None])[groups])
    return tuple(means)


def _first_change(tokens, reference_tokens, groups, end: int) -> int:
    """The first position at which some prompt differs from a reference prompt of its group
    (at most END, which is always carried)."""
    first = end
    for g in groups.unique():
        members = groups == g
        same = (reference_tokens[members][:, None] == tokens[members][None]).all(0).all(0)
        differs = (~same).nonzero()
        if len(differs):
            first = min(first, int(differs[0]))
    return first


def _editor(ablation: MeanAblation, keep: Bool[Tensor, "variant layer batch pos head"], per_variant: int):
    """A `block` edit that mean-ablates the heads' outputs (z) that `keep` does not keep; the
    stacked batch holds `per_variant` prompts of each variant in turn."""

    def ablate(name, layer, z, prompt, pos):
        if name != "z":
            return z
        variant = torch.arange(len(prompt), device=pos.device) // per_variant
        kept = keep[variant[:, None], layer, prompt[:, None], pos][..., None]
        return torch.where(kept, z, ablation.mean_z[layer][prompt[:, None], pos])

    return ablate


@torch.inference_mode()
def base_run(ablation: MeanAblation, keep: Keep) -> Cache:
    """The full forward with everything `keep` does not keep mean-ablated."""
    return run_with_cache(ablation.fast, ablation.tokens, _editor(ablation, keep[None], len(ablation.tokens)))


def end_logit_diff(ablation: MeanAblation, cache: Cache) -> Float[Tensor, " batch"]:
    final = cache.resid_final[torch.arange(len(ablation.end)), ablation.end]
    return logit_diff_at(ablation.fast, final, ablation.io_token, ablation.s_token)


def start_layer(base: Keep, keep: Keep) -> int:
    """The first layer whose kept heads differ from the base's (n_layers if none do)."""
    differs = (base != keep).flatten(1).any(1).nonzero()
    return int(differs[0]) if len(differs) else base.shape[0]


@torch.inference_mode()
def logit_diffs(
    ablation: MeanAblation, keeps: Sequence[Keep], base: Keep | None = None, batch_size: int = 512
) -> Float[Tensor, "variant batch"]:
    """Per-prompt logit difference with everything each `keeps[i]` does not keep mean-ablated.

    Every variant starts from the run of `base` (by default the first variant) at the first
    layer where it differs from it, so give as base the mask the variants are knockouts of."""
    if not len(keeps):
        raise ValueError("no variants to run")
    base = keeps[0] if base is None else base
    cache = base_run(ablation, base)
    batch = ablation.tokens.shape[0]
    out = torch.empty(len(keeps), batch, dtype=ablation.fast.W_E.dtype)
    starts = torch.tensor([start_layer(base, keep) for keep in keeps])
    out[starts == ablation.fast.n_layers] = end_logit_diff(ablation, cache)
    for layer in starts.unique().tolist():
        if layer == ablation.fast.n_layers:
            continue
        todo = (starts == layer).nonzero()[:, 0]
        for prompts, first in ablation.length_groups:
            for chunk in todo.split(max(1, batch_size // len(prompts))):
                keep = torch.stack([keeps[i] for i in chunk])
                out[chunk[:, None], prompts] = _knockouts(ablation, cache, layer, keep, prompts, first)
    return out


def _knockouts(
    ablation: MeanAblation, cache: Cache, layer: int, keep, prompts: Tensor, first: int
) -> Float[Tensor, "variant prompts"]:
    """Logit differences of stacked variants that equal the base run before `layer`, on
    `prompts` (all of one length), carrying the rows from `first` to their END."""
    n_var = keep.shape[0]
    prompt = prompts.repeat(n_var)
    end = int(ablation.end[prompts[0]])
    pos = torch.arange(first, end + 1).expand(len(prompt), -1)
    resid = cache.resid_pre[layer][prompt[:, None], pos]
    end_row = torch.full_like(prompt, end - first)
    final = run_rows(ablation.fast, cache, layer, resid, prompt, pos, end_row,
                     after_attention=False, edit=_editor(ablation, keep, len(prompts)))
    ld = logit_diff_at(ablation.fast, final, ablation.io_token[prompt], ablation.s_token[prompt])
    return ld.view(n_var, len(prompts))


def knockout_estimates(
    ablation: MeanAblation, keep: Keep, chunk: int = 20
) -> tuple[float, Float[Tensor, "layer head"]]:
    """The mean logit difference of the run that keeps `keep`, and for each head the first-order
    change of it from also ablating that head where `keep` keeps it: the sum over kept (prompt,
    position) of (mean z - z) . dF/dz, F the mean over prompts. Prompts are taken `chunk` at a
    time: the backward pass keeps every layer's activations, and the sum splits over prompts."""
    batch = len(ablation.tokens)
    total, estimates = 0.0, torch.zeros(ablation.fast.n_layers, ablation.fast.n_heads, dtype=ablation.fast.W_E.dtype)
    for prompts in torch.arange(batch).split(chunk):
        part = _subset(ablation, prompts)
        metric, change = _knockout_estimates(part, keep[:, prompts])
        total += metric * len(prompts) / batch
        estimates += change * len(prompts) / batch
    return total, estimates


def _subset(ablation: MeanAblation, prompts: Tensor) -> MeanAblation:
    return MeanAblation(
        ablation.fast, ablation.tokens[prompts], ablation.end[prompts], ablation.io_token[prompts],
        ablation.s_token[prompts], tuple(mean[prompts] for mean in ablation.mean_z), length_groups=(),
    )


def _knockout_estimates(ablation: MeanAblation, keep: Keep) -> tuple[float, Float[Tensor, "layer head"]]:
    ablate, zs = _editor(ablation, keep[None], len(ablation.tokens)), []

    def edit_and_keep(name, layer, z, prompt, pos):
        if name != "z":
            return z
        z = ablate(name, layer, z, prompt, pos)
        if not z.requires_grad:  # layer 0: nothing upstream of it needs a gradient
            z.requires_grad_(True)
        z.retain_grad()
        zs.append(z)
        return z

    with torch.enable_grad():
        metric = end_logit_diff(ablation, run_with_cache(ablation.fast, ablation.tokens, edit_and_keep)).mean()
        metric.backward()
    estimates = torch.stack([
        torch.einsum("bphe,bphe,bph->h", mean - z.detach(), z.grad, keep[layer].to(z.dtype))
        for layer, (z, mean) in enumerate(zip(zs, ablation.mean_z))
    ])
    return float(metric.detach()), estimates
