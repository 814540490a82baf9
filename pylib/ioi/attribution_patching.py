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
exact sweep of `ioi.fast`. The forwards here are `ioi.fast`'s pure-torch model, whose logits equal
the bridge's, so gradients are taken without hooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi import fast as fastlib


@dataclass(frozen=True)
class Attribution:
    """Estimated change of the mean logit difference from patching each clean activation in."""

    head_pos: Float[Tensor, "layer pos head"]  # a head's output (hook_z) at one position
    resid_pre: Float[Tensor, "layer pos"]  # the residual stream before a layer, at one position
    corrupted_logit_diff: float  # the metric on the unpatched corrupted run

    @property
    def head(self) -> Float[Tensor, "layer head"]:
        """All positions at once: the first-order effects of positions add up."""
        return self.head_pos.sum(1)


def _forward(fast: fastlib.FastModel, tokens: Tensor, keep_grad: bool):
    """The forward, returning every layer's resid_pre and z (with .grad kept if asked) and the
    final residual stream."""
    pos = torch.arange(tokens.shape[1]).expand(tokens.shape)
    resid = fastlib.embed(fast, tokens)
    if keep_grad:
        resid.requires_grad_(True)  # the weights are frozen: grads flow from here on
    resid_pre, zs = [], []
    for layer in fast.layers:
        x = fastlib.norm(fast, resid)
        k, v = fastlib.keys_values(fast, layer, x, pos)
        z = fastlib.attention_z(fast, layer, x, pos, k, v)
        if keep_grad:
            resid.retain_grad()
            z.retain_grad()
        resid_pre.append(resid)
        zs.append(z)
        mid = resid + fastlib.head_out(layer, z)
        resid = mid + fastlib.mlp(fast, layer, fastlib.norm(fast, mid))
    return resid_pre, zs, resid


def attribute(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
) -> Attribution:
    """(a_clean - a_corr) . grad for every head output and resid_pre, by layer and position."""
    fast = fastlib.as_fast(model_or_fast)
    with torch.no_grad():
        clean_resid, clean_z, _ = _forward(fast, clean_tokens, keep_grad=False)
    with torch.enable_grad():
        resid_pre, zs, final = _forward(fast, corrupted_tokens, keep_grad=True)
        at_end = final[torch.arange(len(end)), end]
        metric = fastlib.logit_diff_at(fast, at_end, io_token, s_token).mean()
        metric.backward()
    head_pos = torch.stack([
        torch.einsum("bphe,bphe->ph", c - z.detach(), z.grad) for c, z in zip(clean_z, zs)
    ])
    resid = torch.stack([
        torch.einsum("bpd,bpd->p", c - r.detach(), r.grad) for c, r in zip(clean_resid, resid_pre)
    ])
    return Attribution(head_pos, resid, float(metric.detach()))


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
    effect = (exact - approx.corrupted_logit_diff).flatten().double().numpy()
    estimate = approx.head.flatten().double().numpy()
    return {
        "pearson_r": float(np.corrcoef(effect, estimate)[0, 1]),
        "top10_overlap": top_k_overlap(effect, estimate, 10),
        "exact_s": exact_s,
        "attribution_s": attribution_s,
        "speedup": exact_s / attribution_s,
    }


def top_k_overlap(a, b, k: int = 10) -> float:
    """The fraction of the k largest |a| that are also among the k largest |b|."""
    top = lambda x: set(np.argsort(-np.abs(np.asarray(x)))[:k].tolist())  # noqa: E731
    return len(top(a) & top(b)) / k
