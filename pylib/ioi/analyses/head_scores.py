"""The scores Wang et al. 2022 use to say what kind of head a head is.

On the IOI prompts themselves (mean attention probability, per head):
- previous-token: attention from S1+1 back to S1;
- duplicate-token: from S2 back to S1, the earlier copy of the same token;
- induction: from S2 to S1+1, the token after the earlier copy;
- END to IO and END to S: what name movers (IO) and S-inhibition heads (S2) attend to.

On sequences of random tokens repeated twice (§3.3, where each class's signature is unmistakable,
`random_token_scores`): previous-token (each token to the one before it), duplicate-token (each
token of the second copy to its earlier copy) and induction (to the token after its earlier copy).

On the OV circuit (§3.1, "copy score"): take the residual stream at a name's position after the
first MLP, send it through the head's OV circuit and the unembedding; the copy score is the share
of names that come out among the top 5 logits. The negative copy score does the same for the
negated output, the signature of negative name movers.
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.dataset import IOIDataset, repeated_random_tokens
from ioi.analyses.logit_attribution import apply_norm, norm_scale
from ioi.engines import fast
from ioi.engines.hooks import run_with_cache

ATTENTION_SCORES = {
    # score name: (query position, key position)
    "previous_token": ("S1+1", "S1"),
    "duplicate_token": ("S2", "S1"),
    "induction": ("S2", "S1+1"),
    "end_to_io": ("END", "IO"),
    "end_to_s": ("END", "S2"),
}
COPY_TOP_K = 5  # the paper counts a name as copied when it is among the top 5 logits
RANDOM_CHUNK = 10  # random sequences per forward pass


@torch.inference_mode()
def attention_scores(model, dataset: IOIDataset) -> pd.DataFrame:
    """One row per head, one column per score in `ATTENTION_SCORES` (mean over prompts)."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, dataset, names)
    rows = torch.arange(len(dataset))
    out = []
    for layer, name in enumerate(names):
        pattern = cache[name]  # [batch head query key]
        scores = {
            score: pattern[rows, :, dataset.positions[q], dataset.positions[k]].mean(0)
            for score, (q, k) in ATTENTION_SCORES.items()
        }
        for head in range(model.cfg.n_heads):
            out.append({"layer": layer, "head": head, **{s: v[head].item() for s, v in scores.items()}})
    return pd.DataFrame(out)


def _value_weights(model, layer: int, head: int):
    """The head's value weights; under grouped-query attention, those of its key/value group."""
    n_kv = model.W_V.shape[1]
    group = head // (model.cfg.n_heads // n_kv)
    try:
        b_V = model.b_V[layer, group]
    except AttributeError:  # bias-free projections
        b_V = torch.zeros(model.W_V.shape[-1])
    return model.W_V[layer, group], b_V


@torch.inference_mode()
def copy_scores(model, dataset: IOIDataset) -> pd.DataFrame:
    """Per head: the share of names its OV circuit copies (top-5) and negatively copies."""
    _, cache = run_with_cache(model, dataset, ["blocks.1.hook_resid_pre"])
    rows = torch.arange(len(dataset))
    resid = cache["blocks.1.hook_resid_pre"]
    # each prompt's IO and S names, as they stand after the first MLP
    x = torch.cat([resid[rows, dataset.positions["IO"]], resid[rows, dataset.positions["S1"]]])
    targets = torch.cat([dataset.io_token, dataset.s_token])
    copied = _gemma3_copy_logits(model, x) if fast.is_gemma3(model) else _copy_logits(model, x)
    out = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            logits = copied(layer, head)
            out.append(
                {
                    "layer": layer,
                    "head": head,
                    "copy_score": _top_k_share(logits, targets),
                    "negative_copy_score": _top_k_share(-logits, targets),
                }
            )
    return pd.DataFrame(out)


def _copy_logits(model, x: Float[Tensor, "n d_model"]):
    """(layer, head) -> the logits of what the head's OV circuit writes, attending to x alone."""
    x = apply_norm(model, x, norm_scale(model, x))  # ln1; its weight is folded into W_V

    def logits(layer: int, head: int) -> Float[Tensor, "n d_vocab"]:
        W_V, b_V = _value_weights(model, layer, head)
        written = (x @ W_V + b_V) @ model.W_O[layer, head]
        return apply_norm(model, written, norm_scale(model, written)) @ model.W_U

    return logits


def _gemma3_copy_logits(model, x: Float[Tensor, "n d_model"]):
    """`_copy_logits` for Gemma 3, from its unprocessed weights: the norm before attention, the
    OV circuit, the norm after attention (the head's write as the layer's only output), the
    final norm and the unembedding."""
    weights = fast.as_fast(model)

    def logits(layer: int, head: int) -> Float[Tensor, "n d_vocab"]:
        lw = weights.layers[layer]
        group = head // (lw.W_Q.shape[0] // lw.W_V.shape[0])
        v = fast.norm(weights, x, lw.attn_norm_w) @ lw.W_V[group] + lw.b_V[group]
        written = fast.norm(weights, v @ lw.W_O[head], lw.attn_post_norm_w)
        return fast.norm(weights, written, weights.final_norm_w) @ weights.W_U + weights.b_U

    return logits


def _top_k_share(logits: Float[Tensor, "n d_vocab"], targets) -> float:
    top = logits.topk(COPY_TOP_K, dim=-1).indices
    return (top == targets[:, None]).any(-1).double().mean().item()


@torch.inference_mode()
def random_token_scores(model, tokens: Int[Tensor, "batch pos"], length: int) -> pd.DataFrame:
    """One row per head: mean attention on `tokens`, sequences of `length` random tokens repeated
    twice (after a BOS token if the first column is one), from each token of the second copy to
    its earlier copy (duplicate_token_random), to the token after it (induction_random), and from
    every token after the first to the one before it (previous_token_random)."""
    offset = tokens.shape[1] - 2 * length  # 1 with a BOS token, else 0
    if offset not in (0, 1):
        raise ValueError(f"expected sequences of 2 x {length} tokens (after an optional BOS), got width {tokens.shape[1]}")
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    second = torch.arange(offset + length, offset + 2 * length)  # queries in the second copy
    after_first = torch.arange(offset + 1, offset + 2 * length)
    where = {  # score: (queries, the key each query's class looks at)
        "previous_token_random": (after_first, after_first - 1),
        "duplicate_token_random": (second, second - length),
        "induction_random": (second, second - length + 1),
    }
    sums = {score: torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64) for score in where}
    for chunk in tokens.split(RANDOM_CHUNK):  # a chunk at a time: the full logits are large
        _, cache = model.run_with_cache(chunk, names_filter=set(names).__contains__)
        for layer, name in enumerate(names):
            for score, (queries, keys) in where.items():
                sums[score][layer] += cache[name][:, :, queries, keys].sum((0, 2)).double()
    means = {score: total / (len(tokens) * len(where[score][0])) for score, total in sums.items()}
    return pd.DataFrame([{"layer": layer, "head": head, **{s: float(v[layer, head]) for s, v in means.items()}}
                         for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)])


def head_scores(model, dataset: IOIDataset, random_length: int = 25, random_n: int = 50) -> pd.DataFrame:
    """All scores, one row per head: on the IOI prompts, on the OV circuit, and on `random_n`
    sequences of `random_length` random tokens repeated twice (drawn with the dataset's seed,
    with a BOS token where the dataset has one)."""
    tokens = repeated_random_tokens(model.tokenizer, random_n, random_length, dataset.seed, dataset.prepend_bos)
    return (attention_scores(model, dataset)
            .merge(copy_scores(model, dataset), on=["layer", "head"])
            .merge(random_token_scores(model, tokens, random_length), on=["layer", "head"]))


@torch.inference_mode()
def attention_patterns(model, dataset: IOIDataset, heads, prompt: int = 0) -> pd.DataFrame:
    """Attention of each head in `heads` on one prompt (its real tokens only, no padding): one
    row per (head, query, key)."""
    import numpy as np

    one = dataset.subset(np.arange(len(dataset)) == prompt)
    end = int(one.end[0]) + 1
    names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in heads})
    _, cache = run_with_cache(model, one, names)
    tokens = [f"{i}:{model.tokenizer.decode([t])}" for i, t in enumerate(one.tokens[0, :end].tolist())]
    rows = []
    for l, h in heads:
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0, h, :end, :end]
        for q in range(end):
            for k in range(q + 1):
                rows.append({"head": f"{l}.{h}", "query": tokens[q], "key": tokens[k], "query_pos": q, "key_pos": k,
                             "attention": float(pattern[q, k])})
    return pd.DataFrame(rows)
