"""Knock-outs beyond the circuit criteria: who repairs the name movers, and what the MLPs carry.

Both replace components by their mean over the ABC prompts of the same template and token
alignment (`criteria.group_means`, the paper's mean-ablation), at every position, and read the
clean prompts' run with hooks: a few forward passes each, so the readable hook-based version is
the only one.

- Backup name movers (Wang et al. 2022 §3.4). Knocking out GPT-2 small's three name movers costs
  only about 5% of the logit difference, although their direct effect is larger than the logit
  difference itself: other heads take over. The paper's way to see who: each head's direct logit
  attribution before and after the knock-out, each run read with its own final-norm scale.
  Each run's attributions add up to its logit difference (`logit_attribution` checks it), so
  per prompt the logit difference changes by what every other component gains less what the
  name movers lose.
- The MLPs (App. J). Knocking out every MLP after the first turns GPT-2 small's logit
  difference from 3.56 to -1.1: the heads' story runs on MLPs it does not describe.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import torch

from ioi.analyses import logit_attribution
from ioi.circuits import criteria
from ioi.dataset import IOIDataset
from ioi.engines.hooks import run_with_cache
from ioi.metrics import logit_diff_from_end, run_end_logits, summarise

Head = tuple[int, int]


def head_knockout_hooks(heads, means: dict, rows: slice = slice(None)) -> list:
    """Hooks that replace each head in `heads` by its group mean (`criteria.group_means` over the
    ABC prompts) at every position, for the prompts `rows` (a `hooks.Edit` once given the rest)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def ablate(z, hook):
        chosen = by_layer[hook.layer()]
        z = z.clone()
        z[:, :, chosen] = means["means"][hook.name][means["groups"][rows]][:, :, chosen]
        return z

    return [(f"blocks.{layer}.attn.hook_z", ablate) for layer in sorted(by_layer)]


def mlp_knockout_hooks(layers, means: dict, rows: slice = slice(None)) -> list:
    """Hooks that replace each listed layer's MLP output by its group mean at every position,
    for the prompts `rows`."""
    def ablate(out, hook):
        return means["means"][hook.name][means["groups"][rows]]

    return [(f"blocks.{layer}.hook_mlp_out", ablate) for layer in layers]


def backup_changes(model, clean: IOIDataset, corrupted: IOIDataset, movers: list[Head]) -> pd.DataFrame:
    """Every component's direct logit attribution per prompt, before and after mean-ablating
    `movers` (one row per prompt and component: component, layer, head, before, after, and
    `knocked_out` for the movers). The rows of one prompt add up, before and after, to that run's
    logit difference (checked in `logit_attribution`), so their changes add up to its change."""
    knockout = partial(head_knockout_hooks, movers, criteria.group_means(model, corrupted))
    keys = ["prompt_index", "component", "layer", "head"]
    before = logit_attribution.per_prompt_attributions(model, clean)
    after = logit_attribution.per_prompt_attributions(model, clean, knockout)
    frame = before[keys + ["dla"]].rename(columns={"dla": "before"}).merge(
        after[keys + ["dla"]].rename(columns={"dla": "after"}), on=keys, validate="one_to_one")
    chosen = {(int(l), int(h)) for l, h in movers}
    frame["knocked_out"] = [c == "head" and (l, h) in chosen for c, l, h in zip(frame.component, frame.layer, frame["head"])]
    return frame


def backup_per_prompt(changes: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: the logit difference before and after (the sums of each run's attributions),
    the direct effect the knocked-out heads lose, and what the other heads and the other
    components (MLPs, biases) gain."""
    delta = changes.assign(delta=changes.after - changes.before)
    by_prompt = lambda frame: frame.groupby("prompt_index")  # noqa: E731
    other_heads = delta[(delta.component == "head") & ~delta.knocked_out]
    out = pd.DataFrame({
        "logit_diff_before": by_prompt(delta).before.sum(),
        "logit_diff_after": by_prompt(delta).after.sum(),
        "lost": -by_prompt(delta[delta.knocked_out]).delta.sum(),
        "recovered_by_heads": by_prompt(other_heads).delta.sum(),
        "recovered_by_rest": by_prompt(delta[delta.component != "head"]).delta.sum(),
    }).reset_index()
    return out


def head_rises(changes: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per head (the knocked-out ones excluded): mean direct effect before and after, and the
    mean rise with its 95% bootstrap interval over prompts, largest rise first."""
    heads = changes[(changes.component == "head") & ~changes.knocked_out]
    rows = []
    for (layer, head), frame in heads.groupby(["layer", "head"]):
        rise = summarise((frame.after - frame.before).to_numpy(), seed)
        rows.append({"layer": int(layer), "head": int(head), "before": float(frame.before.mean()),
                     "after": float(frame.after.mean()), "rise": rise["mean"], "rise_ci_low": rise["ci_low"],
                     "rise_ci_high": rise["ci_high"]})
    return pd.DataFrame(rows).sort_values("rise", ascending=False, ignore_index=True)


@torch.inference_mode()
def mlp_knockout(model, clean: IOIDataset, corrupted: IOIDataset, first_layer: int = 1) -> pd.DataFrame:
    """Per prompt: the logit difference, and the logit difference with every MLP from
    `first_layer` on mean-ablated at every position (App. J keeps only the first)."""
    layers = list(range(first_layer, model.cfg.n_layers))
    names = [f"blocks.{layer}.hook_mlp_out" for layer in layers]
    knockout = partial(mlp_knockout_hooks, layers, criteria.group_means(model, corrupted, names))
    knocked_out, _ = run_with_cache(model, clean, [], knockout)
    return pd.DataFrame({
        "prompt_index": np.arange(len(clean)),
        "logit_diff": logit_diff_from_end(run_end_logits(model, clean), clean.io_token, clean.s_token).double().numpy(),
        "knocked_out": logit_diff_from_end(knocked_out, clean.io_token, clean.s_token).double().numpy(),
    })
