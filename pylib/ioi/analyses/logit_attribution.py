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
from ioi.metrics import logit_diff_from_end, summarise
from ioi.engines import fast
from ioi.engines.hooks import Edit, run_with_cache


def logit_diff_directions(weights: fast.FastModel, dataset: IOIDataset) -> Float[Tensor, "batch d_model"]:
    """W_U[:, IO] - W_U[:, S] for each prompt, times the final norm's weight where processing
    did not fold it into W_U (Gemma 3)."""
    direction = (weights.W_U[:, dataset.io_token] - weights.W_U[:, dataset.s_token]).T
    if weights.final_norm_w is not None:
        direction = direction * (weights.norm_offset + weights.final_norm_w)
    return direction


def _centred(weights: fast.FastModel, x: Float[Tensor, "batch ... d_model"]) -> Tensor:
    """LayerNorm subtracts each vector's mean; RMSNorm does not."""
    return x - x.mean(-1, keepdim=True) if weights.norm_type == "LN" else x


def final_norm(
    weights: fast.FastModel, x: Float[Tensor, "batch ... d_model"], total: Float[Tensor, "batch d_model"]
) -> Float[Tensor, "batch ... d_model"]:
    """What the final norm (its weight aside) does to `x`, one part of the residual stream
    `total`: centre it, and divide it by the scale the norm computes for `total`, frozen. With
    x = total, the norm itself."""
    centred = _centred(weights, total)
    scale = torch.rsqrt(centred.pow(2).mean(-1) + weights.eps)
    return _centred(weights, x) * scale.view(-1, *[1] * (x.ndim - 1))


def _bias(weights: fast.FastModel, dataset: IOIDataset) -> Float[Tensor, " batch"]:
    return weights.b_U[dataset.io_token] - weights.b_U[dataset.s_token]


@torch.inference_mode()
def per_prompt_attributions(model, dataset: IOIDataset, edit: Edit | None = None) -> pd.DataFrame:
    """Long table: one row per prompt and component, with its direct share of the logit
    difference at END. Components: embed, head (layer, head), attn_bias (layer), mlp (layer),
    unembed_bias. Rows of one prompt sum to its logit difference. With `edit` (`hooks.Edit`, e.g.
    a knockout), the attributions are those of the edited run, with its own final-norm scale.

    One loop for every architecture, on the fast model's weights (the bridge's processed ones, or
    Gemma 3's own): where a norm sits between the heads and the residual stream (Gemma 3's after
    attention), its scale is frozen at the run's value, as the final norm's is, so a head's write
    is z W_O times the layer's `gain` and adds up (the gain is 1 where there is no such norm).
    An MLP's write is what the residual stream gained across the layer besides the attention's."""
    weights = fast.as_fast(model)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.{name}" for l in range(n_layers) for name in ("hook_resid_pre", "attn.hook_z")]
    logits, cache = run_with_cache(model, dataset, names + [f"blocks.{n_layers - 1}.hook_resid_post"], edit)
    at = torch.arange(len(dataset)), dataset.end
    resid = [cache[f"blocks.{l}.hook_resid_pre"][at] for l in range(n_layers)]
    resid.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"][at])
    direction = logit_diff_directions(weights, dataset)

    def share(x: Tensor) -> Tensor:  # x: [batch, ..., d_model] at END
        return torch.einsum("b...d,bd->b...", final_norm(weights, x, resid[-1]), direction)

    frames = [_frame(dataset, "embed", -1, -1, share(resid[0]))]
    for layer, lw in enumerate(weights.layers):
        per_head = torch.einsum("bhd,hdm->bhm", cache[f"blocks.{layer}.attn.hook_z"][at], lw.W_O)
        gain = _post_norm_gain(weights, lw, per_head.sum(1) + lw.b_O)
        heads = share(per_head * gain[:, None])
        for head in range(model.cfg.n_heads):
            frames.append(_frame(dataset, "head", layer, head, heads[:, head]))
        attention = (per_head.sum(1) + lw.b_O) * gain
        frames.append(_frame(dataset, "attn_bias", layer, -1, share(lw.b_O * gain)))
        frames.append(_frame(dataset, "mlp", layer, -1, share(resid[layer + 1] - resid[layer] - attention)))
    frames.append(_frame(dataset, "unembed_bias", -1, -1, _bias(weights, dataset)))
    out = pd.concat(frames, ignore_index=True)
    _check_decomposes(model, out, logit_diff_from_end(logits, dataset.io_token, dataset.s_token))
    return out


def _post_norm_gain(weights, layer, attention: Float[Tensor, "batch d_model"]) -> Tensor:
    """What the norm after attention multiplies the attention's output by, frozen at `attention`
    (the run's own output): its scale times its weight; 1 without such a norm."""
    if layer.attn_post_norm_w is None:
        return torch.ones_like(attention)
    return torch.rsqrt(attention.pow(2).mean(-1, keepdim=True) + weights.eps) * (weights.norm_offset + layer.attn_post_norm_w)


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
    """The logit difference read off the residual stream at END after each layer, through the
    final norm and the unembedding (the last layer's reading is the model's)."""
    weights = fast.as_fast(model)
    names = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, dataset, names)
    at, direction = (torch.arange(len(dataset)), dataset.end), logit_diff_directions(weights, dataset)
    rows = []
    for layer, name in enumerate(names):
        resid = cache[name][at]
        values = (final_norm(weights, resid, resid) * direction).sum(-1) + _bias(weights, dataset)
        rows.append({"layer": layer, **summarise(values.double().numpy(), seed)})
    return pd.DataFrame(rows)
