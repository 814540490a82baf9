"""Direct logit attribution and the logit lens (Wang et al. 2022 §3.1; nostalgebraist 2020).

The residual stream at END just before the final norm is a sum of what every component wrote:
the embeddings, each attention head, each layer's attention bias, each MLP. The final norm
divides that sum by one scale per prompt (and, for LayerNorm, subtracts its mean), so with the
scale read from the clean run's cache, each component's share of the logit difference is

    ((c - mean(c)) / scale) . (W_U[:, IO] - W_U[:, S])

and the shares add up exactly to the logit difference (less the unembedding bias's share,
which we report as its own row). Compatibility mode folds the norm's weight into W_U.

The logit lens reads the logit difference off the residual stream after each layer, as if the
remaining layers did nothing; the last layer's reading is the model's logit difference.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ioi.dataset import IOIDataset
from ioi.metrics import logit_diff, summarise
from ioi.engines import fast
from ioi.engines.hooks import run_with_cache


def logit_diff_directions(model, dataset: IOIDataset) -> Float[Tensor, "batch d_model"]:
    """W_U[:, IO] - W_U[:, S] for each prompt."""
    return (model.W_U[:, dataset.io_token] - model.W_U[:, dataset.s_token]).T


def apply_norm(model, x: Float[Tensor, "batch ... d_model"], scale: Float[Tensor, " batch"]):
    """What a norm (weight folded away) does to one component of a sum, given the sum's scale."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    return x / scale.reshape(-1, *([1] * (x.ndim - 1)))


def _attn_bias(model, layer: int) -> Float[Tensor, " d_model"]:
    try:
        return model.b_O[layer]
    except AttributeError:  # bias-free projections (Llama) have no b_O at all
        return torch.zeros(model.cfg.d_model)


def _hook_names(model) -> list[str]:
    names = ["ln_final.hook_scale", "blocks.0.hook_resid_pre"]
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
        names += [f"blocks.{layer}.hook_resid_post"]
    return names


@torch.inference_mode()
def per_prompt_attributions(model, dataset: IOIDataset, fwd_hooks=()) -> pd.DataFrame:
    """Long table: one row per prompt and component, with its direct share of the logit
    difference at END. Components: embed, head (layer, head), attn_bias (layer), mlp (layer),
    unembed_bias. Rows of one prompt sum to its logit difference. With `fwd_hooks` (e.g. a
    knockout), the attributions are those of the edited run, with its own final-norm scale."""
    if fast.is_gemma3(model):
        return _post_norm_attributions(model, dataset, fwd_hooks)
    logits, cache = run_with_cache(model, dataset, _hook_names(model), fwd_hooks)
    rows_idx = torch.arange(len(dataset))
    end = dataset.end
    scale = cache["ln_final.hook_scale"][rows_idx, end, 0]
    direction = logit_diff_directions(model, dataset)

    def share(x: Tensor) -> Tensor:  # x: [batch, ..., d_model] at END
        normed = apply_norm(model, x, scale)
        return torch.einsum("b...d,bd->b...", normed, direction)

    frames = [_frame(dataset, "embed", -1, -1, share(cache["blocks.0.hook_resid_pre"][rows_idx, end]))]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows_idx, end]  # [batch head d_head]
        heads = share(torch.einsum("bhd,hdm->bhm", z, model.W_O[layer]))
        for head in range(model.cfg.n_heads):
            frames.append(_frame(dataset, "head", layer, head, heads[:, head]))
        bias = _attn_bias(model, layer).expand(len(dataset), -1)
        frames.append(_frame(dataset, "attn_bias", layer, -1, share(bias)))
        frames.append(_frame(dataset, "mlp", layer, -1, share(cache[f"blocks.{layer}.hook_mlp_out"][rows_idx, end])))
    return _finish(model, dataset, frames, logits)


def _post_norm_attributions(model, dataset: IOIDataset, fwd_hooks=()) -> pd.DataFrame:
    """`per_prompt_attributions` for Gemma 3, whose attention output is normalised before it
    joins the residual stream: norm(sum_h z_h W_O[h]) = sum_h (z_h W_O[h]) * (1 + w) / s, with
    s the scale of the heads' sum. Frozen at its clean value, as the final norm's scale is, s
    makes each head's write, and so its direct share, additive. Weights are the fast model's
    (Gemma 3's own, unprocessed); an MLP's write is the residual stream's change across it."""
    weights = fast.as_fast(model)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.{name}" for l in range(model.cfg.n_layers)
                                           for name in ("attn.hook_z", "hook_resid_mid", "hook_resid_post")]
    logits, cache = run_with_cache(model, dataset, names, fwd_hooks)
    at = torch.arange(len(dataset)), dataset.end
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][at]
    unembed = weights.W_U[:, dataset.io_token].T - weights.W_U[:, dataset.s_token].T
    direction = unembed * (weights.norm_offset + weights.final_norm_w)
    final_scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + weights.eps)

    def share(x: Tensor) -> Tensor:  # x: [batch, ..., d_model] at END
        return torch.einsum("b...d,bd->b...", x * final_scale.view(-1, *[1] * (x.ndim - 1)), direction)

    frames = [_frame(dataset, "embed", -1, -1, share(cache["blocks.0.hook_resid_pre"][at]))]
    for layer, lw in enumerate(weights.layers):
        per_head = torch.einsum("bhd,hdm->bhm", cache[f"blocks.{layer}.attn.hook_z"][at], lw.W_O)
        summed = per_head.sum(1) + lw.b_O
        scale = torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + weights.eps)
        gain = scale * (weights.norm_offset + lw.attn_post_norm_w)  # [batch d_model]
        heads = share(per_head * gain[:, None])
        for head in range(model.cfg.n_heads):
            frames.append(_frame(dataset, "head", layer, head, heads[:, head]))
        frames.append(_frame(dataset, "attn_bias", layer, -1, share(lw.b_O * gain)))
        mlp_write = cache[f"blocks.{layer}.hook_resid_post"][at] - cache[f"blocks.{layer}.hook_resid_mid"][at]
        frames.append(_frame(dataset, "mlp", layer, -1, share(mlp_write)))
    return _finish(model, dataset, frames, logits, weights.b_U)


def _finish(model, dataset: IOIDataset, frames: list[pd.DataFrame], logits: Tensor, b_U=None) -> pd.DataFrame:
    """The unembedding bias's row, and the check that every prompt's rows add up."""
    if b_U is None:
        b_U = model.b_U if model.b_U is not None else torch.zeros(model.cfg.d_vocab)
    frames.append(_frame(dataset, "unembed_bias", -1, -1, b_U[dataset.io_token] - b_U[dataset.s_token]))
    out = pd.concat(frames, ignore_index=True)
    _check_decomposes(model, out, logit_diff(logits, dataset))
    return out


def _check_decomposes(model, per_prompt: pd.DataFrame, logit_diffs: Tensor) -> None:
    """The shares must add up to each prompt's logit difference. They do not where a norm sits
    between the heads and the residual stream that this module does not freeze (any but Gemma
    3's): refuse, naming it."""
    summed = torch.tensor(per_prompt.groupby("prompt_index").dla.sum().to_numpy())
    error = float((summed - logit_diffs.double()).abs().max())
    if error > 1e-3 * max(1.0, float(logit_diffs.abs().max())):
        raise NotImplementedError(
            f"{getattr(model, 'ioi_name', 'this model')}: direct logit attributions do not add up to the "
            f"logit difference (off by {error:.3g}); its heads' outputs pass through a norm before the "
            "residual stream (e.g. Gemma's post-attention norm), so they have no direct share."
        )


def _frame(dataset, component, layer, head, values: Tensor) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_index": range(len(dataset)),
            "template_id": dataset.template_id,
            "component": component,
            "layer": layer,
            "head": head,
            "dla": values.double().numpy(),
        }
    )


def summarise_by(per_prompt: pd.DataFrame, keys, value: str, seed: int = 0) -> pd.DataFrame:
    """Mean and 95% bootstrap CI of `value` over prompts, for each group of `keys`."""
    rows = []
    for group, frame in per_prompt.groupby(keys, sort=False):
        group = group if isinstance(group, tuple) else (group,)
        stats = summarise(frame[value].to_numpy(), seed)
        rows.append({**dict(zip(keys, group)), **stats})
    return pd.DataFrame(rows)


def head_attributions(model, dataset: IOIDataset, seed: int = 0) -> pd.DataFrame:
    """Per head: mean direct logit attribution at END with its 95% CI, largest first."""
    per_prompt = per_prompt_attributions(model, dataset)
    heads = summarise_by(per_prompt[per_prompt.component == "head"], ["layer", "head"], "dla", seed)
    return heads.sort_values("mean", key=abs, ascending=False, ignore_index=True)


def layer_attributions(model, dataset: IOIDataset, seed: int = 0) -> pd.DataFrame:
    """Per layer: the direct share of its attention (heads plus bias) and of its MLP."""
    per_prompt = per_prompt_attributions(model, dataset)
    per_prompt = per_prompt.assign(
        part=per_prompt.component.replace({"head": "attn", "attn_bias": "attn"})
    )
    summed = per_prompt.groupby(["prompt_index", "part", "layer"], as_index=False).dla.sum()
    return summarise_by(summed, ["part", "layer"], "dla", seed)


@torch.inference_mode()
def logit_lens(model, dataset: IOIDataset, seed: int = 0) -> pd.DataFrame:
    """The logit difference read off the residual stream at END after each layer."""
    names = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, dataset, names)
    rows_idx, direction = torch.arange(len(dataset)), logit_diff_directions(model, dataset)
    b_U = model.b_U if model.b_U is not None else torch.zeros(model.cfg.d_vocab)
    bias = b_U[dataset.io_token] - b_U[dataset.s_token]
    rows = []
    for layer, name in enumerate(names):
        resid = cache[name][rows_idx, dataset.end]
        normed = apply_norm(model, resid, norm_scale(model, resid))
        values = (normed * direction).sum(-1) + bias
        rows.append({"layer": layer, **summarise(values.double().numpy(), seed)})
    return pd.DataFrame(rows)


def norm_scale(model, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
    """The scale a LayerNorm or RMSNorm computes for this vector."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        resid = resid - resid.mean(-1, keepdim=True)
    return (resid.pow(2).mean(-1) + model.cfg.eps).sqrt()
