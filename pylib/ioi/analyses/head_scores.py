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
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ioi.dataset import IOIDataset, repeated_random_tokens
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
SCREEN_STRIDE = 16  # `copy_hits` first computes every 16th logit: a sixteenth of the unembedding
SCREEN_MARGIN = 1e-4  # a screened token beats the target by more than this share of the row's scale
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


@torch.inference_mode()
def copy_scores(model, dataset: IOIDataset, screen_stride: int = SCREEN_STRIDE) -> pd.DataFrame:
    """Per head: the share of names its OV circuit copies (top-5) and negatively copies
    (`copy_hits`, exactly the top-5 of every logit, computed for the rows that need it)."""
    # the residual stream after the first block: the run stops there
    _, cache = model.run_with_cache(dataset.tokens, names_filter="blocks.0.hook_resid_post".__eq__, stop_at_layer=1)
    rows = torch.arange(len(dataset))
    resid = cache["blocks.0.hook_resid_post"]
    # each prompt's IO and S names, as they stand after the first MLP
    x = torch.cat([resid[rows, dataset.positions["IO"]], resid[rows, dataset.positions["S1"]]])
    targets = torch.cat([dataset.io_token, dataset.s_token])
    unembedded, W_U, b_U = _copy_inputs(model, x)
    out = []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            copied, anti = copy_hits(unembedded(layer, head), W_U, b_U, targets, screen_stride)
            out.append({"layer": layer, "head": head, "copy_score": copied.double().mean().item(),
                        "negative_copy_score": anti.double().mean().item()})
    return pd.DataFrame(out)


def _copy_inputs(model, x: Float[Tensor, "n d_model"]):
    """(layer, head) -> what meets the unembedding when the head's OV circuit attends to x alone
    (its logits are that @ W_U + b_U), with W_U and b_U: from the fast model's weights, so one
    path serves every architecture: the norm before attention (its weight folded into W_V where
    processing folds it), the head's value and output weights (a key/value group's values under
    grouped-query attention), the norm after attention where there is one (Gemma 3: the head's
    write as the layer's only output), the final norm."""
    weights = fast.as_fast(model)

    def unembedded(layer: int, head: int) -> Float[Tensor, "n d_model"]:
        lw = weights.layers[layer]
        group = head // (lw.W_Q.shape[0] // lw.W_V.shape[0])
        written = (fast.attn_input(weights, lw, x) @ lw.W_V[group] + lw.b_V[group]) @ lw.W_O[head]
        if lw.attn_post_norm_w is not None:
            written = fast.norm(weights, written, lw.attn_post_norm_w)
        return fast.norm(weights, written, weights.final_norm_w)

    return unembedded, weights.W_U, weights.b_U


def copy_hits(
    unembedded: Float[Tensor, "n d_model"], W_U: Float[Tensor, "d_model d_vocab"], b_U: Float[Tensor, " d_vocab"],
    targets: Int[Tensor, " n"], screen_stride: int = SCREEN_STRIDE,
) -> tuple[Bool[Tensor, " n"], Bool[Tensor, " n"]]:
    """Per row: is its target among the top 5 of `logits = unembedded @ W_U + b_U`, and among the
    top 5 of `-logits`? The readable answer is `logits.topk(5)` on every row, a whole-vocabulary
    product per row (150k columns on Qwen). Most rows of most heads need far less: a target that
    5 tokens beat is not in the top 5, so every `screen_stride`-th column is computed first, and
    a row where 5 of them beat the target by more than float rounding (`SCREEN_MARGIN`) is
    settled, in each direction; only the rest get the whole row and its top 5, as before."""
    logits = lambda cols: unembedded @ W_U[:, cols] + b_U[cols]  # noqa: E731
    target = (unembedded * W_U[:, targets].T).sum(-1) + b_U[targets]
    sample = logits(slice(None, None, screen_stride))
    margin = SCREEN_MARGIN * sample.abs().amax(-1)
    beaten = (sample > (target + margin)[:, None]).sum(-1) >= COPY_TOP_K
    beaten_negated = (sample < (target - margin)[:, None]).sum(-1) >= COPY_TOP_K
    copied, anti = torch.zeros_like(beaten), torch.zeros_like(beaten)
    rest = (~beaten | ~beaten_negated).nonzero().squeeze(-1)
    if len(rest):
        full = unembedded[rest] @ W_U + b_U
        copied[rest] = _in_top_k(full, targets[rest]) & ~beaten[rest]
        anti[rest] = _in_top_k(-full, targets[rest]) & ~beaten_negated[rest]
    return copied, anti


def _in_top_k(logits: Float[Tensor, "n d_vocab"], targets: Int[Tensor, " n"]) -> Bool[Tensor, " n"]:
    return (logits.topk(COPY_TOP_K, dim=-1).indices == targets[:, None]).any(-1)


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
    for chunk in tokens.split(RANDOM_CHUNK):  # a chunk at a time; the run stops before the unembedding
        _, cache = model.run_with_cache(chunk, names_filter=set(names).__contains__, stop_at_layer=model.cfg.n_layers)
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
