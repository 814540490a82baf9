"""Attribution patching: every activation patch at once, to first order.

Activation patching (Wang et al. 2022) measures, for each component, M(patched) - M(corrupted):
the change in the metric M (here the mean logit difference at END) when the component's clean
activation a_clean replaces its corrupted one a_corr. Attribution patching (Nanda 2023,
"Attribution Patching: Activation Patching At Industrial Scale"; Syed, Rager & Conmy 2023,
"Attribution Patching Outperforms Automated Circuit Discovery") replaces each of those forwards
by a first-order Taylor expansion around the corrupted run:

    M(patched) - M(corrupted)  ~=  (a_clean - a_corr) . dM/da  (at the corrupted run)

One clean forward (for a_clean), one corrupted forward and one backward pass of M (for a_corr and
the gradient) then give the estimate for every component and position together. It is exact when
M is linear in the patched activation along the path from a_corr to a_clean, and degrades where
attention patterns or norms bend that path; `compare_with_exact` measures how much, against the
exact sweep of `ioi.engines.fast`. The forwards here are `ioi.engines.fast`'s pure-torch model, whose logits equal
the bridge's, so gradients are taken without hooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.engines import fast as fastlib


@dataclass(frozen=True)
class Attribution:
    """Estimated change of the mean logit difference from patching each clean activation in."""

    head_pos: Float[Tensor, "layer pos head"]  # a head's output (hook_z) at one position
    resid_pre: Float[Tensor, "layer pos"]  # the residual stream before a layer, at one position
    attn_out: Float[Tensor, " layer"]  # a whole attention layer's output, every position
    mlp_out: Float[Tensor, " layer"]  # a whole MLP layer's output, every position
    q: Float[Tensor, "layer head"]  # a head's queries, every position
    k: Float[Tensor, "layer kv_head"]  # a key/value head's keys (rotated; the same to first order)
    v: Float[Tensor, "layer kv_head"]
    corrupted_logit_diff: float  # the metric on the unpatched corrupted run

    @property
    def head(self) -> Float[Tensor, "layer head"]:
        """All positions at once: the first-order effects of positions add up."""
        return self.head_pos.sum(1)


def _forward(fast: fastlib.FastModel, tokens: Tensor, keep_grad: bool):
    """The forward (`fastlib.block`), returning every layer's activations by name (with .grad
    kept if asked: a gradient tap) and the final residual stream."""
    pos = torch.arange(tokens.shape[1]).expand(tokens.shape)
    prompt = torch.arange(tokens.shape[0])
    resid = fastlib.embed(fast, tokens)
    if keep_grad:
        resid.requires_grad_(True)  # the weights are frozen: grads flow from here on
    acts = {name: [] for name in fastlib.EDITABLE}

    def tap(name, layer, value, prompt, pos):
        if keep_grad:
            value.retain_grad()
        acts[name].append(value)
        return value

    for i in range(fast.n_layers):
        resid = fastlib.block(fast, i, resid, prompt, pos, edit=tap)
    return acts, resid


def attribute(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    chunk: int = 20,
) -> Attribution:
    """(a_clean - a_corr) . grad for every head's output, queries, keys and values, every
    layer's attention and MLP output, and resid_pre by layer and position. Prompts go `chunk` at
    a time: the backward pass keeps every layer's activations (12 GB for 100 prompts on a 1.5B
    model), and since prompts do not interact, each chunk's share of the mean's gradient is
    exactly the whole batch's for its prompts, so the sums over chunks are the estimates."""
    fast = fastlib.as_fast(model_or_fast)
    batch = len(end)
    totals: dict[str, Tensor] = {}
    metric_total = 0.0
    patterns = {"head_pos": ("z", "bphe,bphe->ph"), "resid_pre": ("resid_pre", "bpd,bpd->p"),
                "attn_out": ("attn_out", "bpd,bpd->"), "mlp_out": ("mlp_out", "bpd,bpd->"),
                "q": ("q", "bphe,bphe->h"), "k": ("k", "bphe,bphe->h"), "v": ("v", "bphe,bphe->h")}
    for rows in torch.arange(batch).split(chunk):
        with torch.no_grad():
            clean_acts, _ = _forward(fast, clean_tokens[rows], keep_grad=False)
        with torch.enable_grad():
            acts, final = _forward(fast, corrupted_tokens[rows], keep_grad=True)
            at_end = final[torch.arange(len(rows)), end[rows]]
            metric = fastlib.logit_diff_at(fast, at_end, io_token[rows], s_token[rows]).sum() / batch
            metric.backward()
        metric_total += float(metric.detach())
        for field, (name, pattern) in patterns.items():
            part = torch.stack([torch.einsum(pattern, c - a.detach(), a.grad) for c, a in zip(clean_acts[name], acts[name])])
            totals[field] = part if field not in totals else totals[field] + part
        del acts, clean_acts, final
    return Attribution(**totals, corrupted_logit_diff=metric_total)


def compare_with_exact(model, clean, corrupted, batch_size: int = 512) -> dict:
    """How well attribution patching ranks heads (all positions) against the exact sweep, and
    how much faster it is. `clean` and `corrupted` are `IOIDataset`s."""
    args = (clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)
    fastlib.as_fast(model)  # extract the weights before timing either method
    start = time.perf_counter()
    exact = fastlib.head_out_sweep(model, *args, positions="all", batch_size=batch_size)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    approx = attribute(model, *args)
    attribution_s = time.perf_counter() - start
    return {
        **agreement(exact - approx.corrupted_logit_diff, approx.head),
        "exact_s": exact_s,
        "attribution_s": attribution_s,
        "speedup": exact_s / attribution_s,
    }


def compare_components(model, clean, corrupted) -> dict:
    """Where attribution patching fails: its agreement with exact patching for each kind of
    component (the literature reports trouble at MLP0, the residual stream and some queries and
    keys), and the largest errors. Each entry: Pearson r, top-10 overlap, the number of
    components, and the exact sweep's seconds."""
    args = (clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)
    approx = attribute(model, *args)
    base = approx.corrupted_logit_diff
    first = int((clean.tokens != corrupted.tokens).any(0).nonzero()[0])
    last = int(clean.end.max()) + 1  # patches outside [first, last) change nothing: left out
    n_heads = fastlib.as_fast(model).n_heads
    all_heads = [(l, h) for l in range(len(approx.q)) for h in range(n_heads)]
    kv_heads = [(l, h) for l in range(len(approx.k)) for h in range(approx.k.shape[1])]
    exact_sweeps = {
        "head_out": lambda: fastlib.head_out_sweep(model, *args),
        "resid_pre": lambda: fastlib.resid_sweep(model, *args)[:, first:last],
        "attn_out": lambda: fastlib.layer_out_sweep(model, *args, component="attn_out"),
        "mlp_out": lambda: fastlib.layer_out_sweep(model, *args, component="mlp_out"),
        "q": lambda: fastlib.head_input_sweep(model, *args, "q", all_heads).view(approx.q.shape),
        "k": lambda: fastlib.head_input_sweep(model, *args, "k", kv_heads).view(approx.k.shape),
        "v": lambda: fastlib.head_input_sweep(model, *args, "v", kv_heads).view(approx.v.shape),
    }
    estimates = {"head_out": approx.head, "resid_pre": approx.resid_pre[:, first:last], "attn_out": approx.attn_out,
                 "mlp_out": approx.mlp_out, "q": approx.q, "k": approx.k, "v": approx.v}
    result, effects = {}, {}
    for name, sweep in exact_sweeps.items():
        start = time.perf_counter()
        effects[name] = effect = sweep() - base
        result[name] = {**agreement(effect, estimates[name]), "n": effect.numel(),
                        "exact_s": time.perf_counter() - start,
                        "largest_error": _largest_error(effect, estimates[name])}
    result["resid_pre"]["first_position"] = first  # its position indices count from here
    result["mlp_out"]["layer_0"] = {"exact": float(effects["mlp_out"][0]), "estimate": float(approx.mlp_out[0])}
    return result


def agreement(effect: Tensor, estimate: Tensor) -> dict:
    """Pearson r and top-10 overlap between exact effects and their estimates."""
    effect, estimate = effect.flatten().double().numpy(), estimate.flatten().double().numpy()
    return {"pearson_r": float(np.corrcoef(effect, estimate)[0, 1]), "top10_overlap": top_k_overlap(effect, estimate, 10)}


def _largest_error(effect: Tensor, estimate: Tensor) -> dict:
    """The component (its index: layer, then head or position) the estimate misses most."""
    error = (estimate - effect).abs()
    index = [int(i) for i in np.unravel_index(int(error.argmax()), error.shape)]
    return {"index": index, "exact": float(effect.flatten()[error.argmax()]),
            "estimate": float(estimate.flatten()[error.argmax()])}


def top_k_overlap(a, b, k: int = 10) -> float:
    """The fraction of the k largest |a| that are also among the k largest |b|."""
    top = lambda x: set(np.argsort(-np.abs(np.asarray(x)))[:k].tolist())  # noqa: E731
    return len(top(a) & top(b)) / min(k, len(np.asarray(a)))
