"""The model as plain tensors, and its forward a function at a time.

`FastModel` holds one `Layer` of weights per block; `embed`, `norm`, `queries`, `keys_values`,
`attention_pattern`, `attend`, `head_out` and `mlp` are the forward in reading order, and
`block` strings them into one transformer block: the forward step, written once. Every engine
is a loop of `block` with edits, the way `transformer_lens.patching` is one generic patch and
its setters: `edit(name, layer, value, prompt, pos)` sees each of `EDITABLE` as the block
computes it and returns what the block goes on with (a patch, a mean-ablation, or a gradient
tap that keeps the value and returns it). `run_with_cache` runs the blocks over whole prompts,
keeping what the sweeps start from (`Cache`); `run_rows` runs them for a few rows of each
prompt against another run's cached keys and values: the step every sweep repeats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

MAX_ROTARY_POSITIONS = 2048  # rotary tables are precomputed up to here; IOI prompts are ~20 tokens
Positions = Literal["all", "end"]


# --- The model as tensors --------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One transformer block's compatibility-mode weights (TransformerLens shapes)."""

    W_Q: Float[Tensor, "head d_model d_head"]
    b_Q: Float[Tensor, "head d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    W_V: Float[Tensor, "kv_head d_model d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, " d_model"]
    W_in: Float[Tensor, "d_model d_mlp"]
    b_in: Float[Tensor, " d_mlp"]
    W_gate: Float[Tensor, "d_model d_mlp"] | None  # SwiGLU's gate; None for a plain MLP
    W_out: Float[Tensor, "d_mlp d_model"]
    b_out: Float[Tensor, " d_model"]
    # Gemma 3, read unprocessed: weighted RMSNorms before attention and MLP (elsewhere folded into
    # W_Q/K/V and W_in), norms after them that no processing can fold, query and key norms, and
    # a rotary table and attention window of the layer's own (sliding-window or global layer)
    attn_norm_w: Float[Tensor, " d_model"] | None = None
    mlp_norm_w: Float[Tensor, " d_model"] | None = None
    attn_post_norm_w: Float[Tensor, " d_model"] | None = None
    mlp_post_norm_w: Float[Tensor, " d_model"] | None = None
    q_norm_w: Float[Tensor, " d_head"] | None = None
    k_norm_w: Float[Tensor, " d_head"] | None = None
    rotary_cos: Float[Tensor, "n_ctx d_head"] | None = None
    rotary_sin: Float[Tensor, "n_ctx d_head"] | None = None
    window: int | None = None  # a key is seen from at most window - 1 positions later




@dataclass(frozen=True)
class FastModel:
    layers: tuple[Layer, ...]
    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None  # learned positions (GPT-2); None with rotary
    rotary_cos: Float[Tensor, "n_ctx d_head"] | None  # rotary tables (Llama); None otherwise
    rotary_sin: Float[Tensor, "n_ctx d_head"] | None
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"]
    norm_type: Literal["LN", "RMS"]
    eps: float
    act_fn: str
    # GPT-NeoX (Pythia): attention and MLP both read the residual stream before the layer
    parallel: bool = False
    # Gemma 3: embeddings scaled by sqrt(d_model), the final norm's weight (unfolded), norms that
    # scale by (1 + w) rather than w, and attention scores divided by sqrt(query_pre_attn_scalar)
    embed_scale: float = 1.0
    final_norm_w: Float[Tensor, " d_model"] | None = None
    norm_offset: float = 0.0
    attn_scale: float | None = None  # None: sqrt(d_head)
    # the one result `reuse.reuse_last` keeps for this model (the study's cached runs)
    kept: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.layers[0].W_Q.shape[0]


# --- The forward, a function at a time -------------------------------------------------------


def embed(fast: FastModel, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
    resid = fast.W_E[tokens]
    if fast.embed_scale != 1.0:
        resid = resid * fast.embed_scale
    if fast.W_pos is not None:
        resid = resid + fast.W_pos[: tokens.shape[1]]
    return resid


def norm(fast: FastModel, x: Float[Tensor, "... d"], weight: Float[Tensor, " d"] | None = None) -> Float[Tensor, "... d"]:
    """LayerNorm or RMSNorm, with its scale folded into the next weights (weight None), or
    applied here: x * w, or x * (1 + w) in Gemma."""
    if fast.norm_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + fast.eps)
    return x if weight is None else x * (fast.norm_offset + weight)


def attn_input(fast: FastModel, layer: Layer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """What the layer's attention reads: the normalised residual stream."""
    return norm(fast, resid, layer.attn_norm_w)


def mlp_input(fast: FastModel, layer: Layer, resid_pre: Tensor, resid_mid: Tensor) -> Tensor:
    """The normalised MLP input: from the residual after attention, or, in a parallel block
    (GPT-NeoX), from the one before it."""
    return norm(fast, resid_pre if fast.parallel else resid_mid, layer.mlp_norm_w)


def rotate(fast: FastModel, layer: Layer, x: Float[Tensor, "batch row head d_head"], pos: Int[Tensor, "batch row"]):
    """Rotary position embedding, Hugging Face's half-split convention, with the layer's own
    tables (Gemma 3) or the model's, on the first `rotary_cos.shape[-1]` dimensions of each head
    (all of them but in Pythia)."""
    table_cos, table_sin = (layer.rotary_cos, layer.rotary_sin) if layer.rotary_cos is not None else (fast.rotary_cos, fast.rotary_sin)
    if table_cos is None:
        return x
    return _rotate(x, table_cos[pos][:, :, None], table_sin[pos][:, :, None])


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((_rotate(x[..., :width], cos, sin), x[..., width:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def keys_values(
    fast: FastModel, layer: Layer, x: Float[Tensor, "batch row d_model"], pos: Int[Tensor, "batch row"]
) -> tuple[Float[Tensor, "batch row kv_head d_head"], Float[Tensor, "batch row kv_head d_head"]]:
    k = torch.einsum("brd,hde->brhe", x, layer.W_K) + layer.b_K
    v = torch.einsum("brd,hde->brhe", x, layer.W_V) + layer.b_V
    if layer.k_norm_w is not None:
        k = norm(fast, k, layer.k_norm_w)
    return rotate(fast, layer, k, pos), v


def queries(
    fast: FastModel, layer: Layer, x: Float[Tensor, "batch row d_model"], pos: Int[Tensor, "batch row"]
) -> Float[Tensor, "batch row head d_head"]:
    q = torch.einsum("brd,hde->brhe", x, layer.W_Q) + layer.b_Q
    if layer.q_norm_w is not None:
        q = norm(fast, q, layer.q_norm_w)
    return rotate(fast, layer, q, pos)


def attention_pattern(
    fast: FastModel,
    layer: Layer,
    q: Float[Tensor, "batch row head d_head"],
    k: Float[Tensor, "batch key kv_head d_head"],
    pos: Int[Tensor, "batch row"],
) -> Float[Tensor, "batch head row key"]:
    """Each row's heads attend causally (keys at positions <= the row's position, and within
    the layer's window if it has one)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # query head h reads kv head h//group
    scale = fast.attn_scale if fast.attn_scale is not None else math.sqrt(q.shape[-1])
    scores = torch.einsum("brhe,bkhe->bhrk", q, k) / scale
    key = torch.arange(k.shape[1], device=pos.device)[None, None, None]
    hidden = key > pos[:, None, :, None]
    if layer.window is not None:
        hidden = hidden | (key <= pos[:, None, :, None] - layer.window)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)


def attend(
    pattern: Float[Tensor, "batch head row key"], v: Float[Tensor, "batch key kv_head d_head"]
) -> Float[Tensor, "batch row head d_head"]:
    v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)
    return torch.einsum("bhrk,bkhe->brhe", pattern, v)


def head_out(fast: FastModel, layer: Layer, z: Float[Tensor, "batch row head d_head"]) -> Float[Tensor, "batch row d_model"]:
    """The attention layer's output: its heads' sum, then Gemma 3's post-attention norm. With
    that norm a head's contribution is not additive: patch z, then call this."""
    out = torch.einsum("brhe,hed->brd", z, layer.W_O) + layer.b_O
    return out if layer.attn_post_norm_w is None else norm(fast, out, layer.attn_post_norm_w)


def head_out_changes(
    fast: FastModel,
    layer: Layer,
    z: Float[Tensor, "batch pos head d_head"],
    dz: Float[Tensor, "batch pos head d_head"],
    heads: slice,
) -> Float[Tensor, "chosen batch pos d_model"]:
    """The change of the layer's output from adding dz to one head's z at a time, for each of
    `heads`: dz @ W_O where the output is additive in heads, else recomputed with the norm."""
    if layer.attn_post_norm_w is None:
        return torch.einsum("bphe,hed->hbpd", dz[:, :, heads], layer.W_O[heads])
    chosen = torch.arange(z.shape[2])[heads]
    patched = z[None].repeat(len(chosen), 1, 1, 1, 1)
    patched[torch.arange(len(chosen)), :, :, chosen] += dz[:, :, chosen].movedim(2, 0)
    return head_out(fast, layer, patched.flatten(0, 1)).unflatten(0, (len(chosen), -1)) - head_out(fast, layer, z)


def mlp(fast: FastModel, layer: Layer, x: Float[Tensor, "batch row d_model"]) -> Float[Tensor, "batch row d_model"]:
    if layer.W_gate is not None:  # SwiGLU / GeGLU: act(gate) * up
        out = (_act(fast, x @ layer.W_gate) * (x @ layer.W_in + layer.b_in)) @ layer.W_out + layer.b_out
    else:
        out = _act(fast, x @ layer.W_in + layer.b_in) @ layer.W_out + layer.b_out
    return out if layer.mlp_post_norm_w is None else norm(fast, out, layer.mlp_post_norm_w)


def _act(fast: FastModel, x: Tensor) -> Tensor:
    if fast.act_fn in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if fast.act_fn == "gelu":
        return F.gelu(x)
    if fast.act_fn in ("silu", "swish"):
        return F.silu(x)
    if fast.act_fn == "relu":
        return F.relu(x)
    raise NotImplementedError(f"activation {fast.act_fn!r}")


def logit_diff_at(
    fast: FastModel,
    resid: Float[Tensor, "batch d_model"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """logit(IO) - logit(S) from the final residual stream, two unembedding columns only."""
    direction = fast.W_U[:, io_token].T - fast.W_U[:, s_token].T
    return (norm(fast, resid, fast.final_norm_w) * direction).sum(-1) + fast.b_U[io_token] - fast.b_U[s_token]


# --- The forward step, written once -----------------------------------------------------------


def block(
    fast: FastModel,
    i: int,
    resid: Float[Tensor, "n row d_model"],
    prompt: Int[Tensor, " n"],
    pos: Int[Tensor, "n row"],
    cached_kv: tuple[Tensor, Tensor] | None = None,
    end_row: Int[Tensor, " n"] | None = None,
    edit=None,
) -> Float[Tensor, "n out_row d_model"]:  # out_row: row, or 1 with end_row
    """Block i on rows of prompts: row r of item n is at absolute position pos[n, r] of prompt
    prompt[n]. The rows attend to each other, or, given `cached_kv` (a run's keys and values for
    every position of every prompt), to those with the rows' own written over them: the other
    positions are unchanged. With `end_row`, only that row of each item goes on after the keys and
    values (the last layer, where nothing but END is read). `edit(name, i, value, prompt, pos)`
    may replace each of `EDITABLE` as it is computed."""
    edit = edit or _unedited
    layer = fast.layers[i]
    resid = edit("resid_pre", i, resid, prompt, pos)
    x = attn_input(fast, layer, resid)
    k, v = keys_values(fast, layer, x, pos)
    k, v = edit("k", i, k, prompt, pos), edit("v", i, v, prompt, pos)
    if cached_kv is not None:
        k, v = _with_rows(cached_kv, k, v, prompt, pos)
    if end_row is not None:
        at = torch.arange(len(prompt), device=pos.device), end_row
        x, resid, pos = x[at][:, None], resid[at][:, None], pos[at][:, None]
    q = edit("q", i, queries(fast, layer, x, pos), prompt, pos)
    z = edit("z", i, attend(attention_pattern(fast, layer, q, k, pos), v), prompt, pos)
    mid = resid + edit("attn_out", i, head_out(fast, layer, z), prompt, pos)
    return mid + edit("mlp_out", i, mlp(fast, layer, mlp_input(fast, layer, resid, mid)), prompt, pos)


EDITABLE = ("resid_pre", "q", "k", "v", "z", "attn_out", "mlp_out")


def _unedited(name, layer, value, prompt, pos):
    return value


def _with_rows(cached_kv, k_rows, v_rows, prompt, pos):
    """The cached keys and values of each item's prompt, with its rows' recomputed ones."""
    k, v = cached_kv[0][prompt], cached_kv[1][prompt]  # advanced indexing copies, so writing is safe
    n_idx = torch.arange(len(prompt), device=pos.device)[:, None]
    k[n_idx, pos], v[n_idx, pos] = k_rows, v_rows
    return k, v


# --- Whole prompts, and the rows a patch changes ---------------------------------------------


@dataclass(frozen=True)
class Cache:
    """A full forward's activations per layer, what the sweeps start from and attend to.

    Only what a few rows cannot cheaply give back is kept (the residual stream before each
    layer, the heads' outputs, keys and values): a layer's attention output, the residual after
    it and the MLP output are recomputed for just the rows asked for (`index`, as a tensor index
    into [batch, pos]), by the same operations as the forward. It halves a cache's memory."""

    fast: FastModel
    resid_pre: tuple[Tensor, ...]  # each [batch pos d_model]
    z: tuple[Tensor, ...]  # each [batch pos head d_head]
    k: tuple[Tensor, ...]  # each [batch pos kv_head d_head], rotated
    v: tuple[Tensor, ...]
    resid_final: Tensor

    def attn_out(self, layer: int, index=slice(None)) -> Tensor:
        return head_out(self.fast, self.fast.layers[layer], self.z[layer][index])

    def resid_mid(self, layer: int, index=slice(None)) -> Tensor:
        return self.resid_pre[layer][index] + self.attn_out(layer, index)

    def mlp_out(self, layer: int, index=slice(None)) -> Tensor:
        before = self.resid_pre[layer][index]
        after = before if self.fast.parallel else self.resid_mid(layer, index)  # parallel: unused
        layer_weights = self.fast.layers[layer]
        return mlp(self.fast, layer_weights, mlp_input(self.fast, layer_weights, before, after))


def run_with_cache(fast: FastModel, tokens: Int[Tensor, "batch pos"], edit=None) -> Cache:
    """The full forward, keeping every activation a sweep needs; `edit` as in `block`."""
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    prompt = torch.arange(tokens.shape[0], device=tokens.device)
    acts = {name: [] for name in ("resid_pre", "z", "k", "v")}

    def keep(name, layer, value, prompt, pos):
        value = value if edit is None else edit(name, layer, value, prompt, pos)
        if name in acts:
            acts[name].append(value)
        return value

    resid = embed(fast, tokens)
    for i in range(fast.n_layers):
        resid = block(fast, i, resid, prompt, pos, edit=keep)
    return Cache(fast, **{name: tuple(values) for name, values in acts.items()}, resid_final=resid)


def logits(fast: FastModel, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    """Full logits, for checking `FastModel` against the bridge."""
    return norm(fast, run_with_cache(fast, tokens).resid_final, fast.final_norm_w) @ fast.W_U + fast.b_U


def end_logit_diff(
    fast: FastModel,
    tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    final = run_with_cache(fast, tokens).resid_final
    return logit_diff_at(fast, final[torch.arange(len(end)), end], io_token, s_token)


def run_rows(
    fast: FastModel,
    cache: Cache,
    start_layer: int,
    resid: Float[Tensor, "n row d_model"],
    prompt: Int[Tensor, " n"],
    pos: Int[Tensor, "n row"],
    end_row: Int[Tensor, " n"],
    after_attention: bool = True,
    edit=None,
) -> Float[Tensor, "n d_model"]:
    """Carry changed rows from layer `start_layer`'s residual stream (after its attention, or
    before it with after_attention=False) to the final residual at END (row `end_row`).

    Row r of variant n sits at absolute position pos[n, r] of prompt prompt[n]. Every position
    not among the rows is unchanged, so its keys and values are the cached ones; the rows' own
    keys and values are recomputed and written over them (`block`). After the last layer's keys
    and values only END is needed, so the last attention and MLP run on END alone. `edit` is as
    in `block`. A change given after attention is a change to the attention output alone: the
    residual before it, which a parallel block's MLP reads, is the cached one."""
    n_idx = torch.arange(len(prompt), device=pos.device)
    last = fast.n_layers - 1
    first = start_layer
    if after_attention:  # the rest of the start layer: its MLP
        if start_layer == last:
            resid, pos, end_row = resid[n_idx, end_row, None], pos[n_idx, end_row, None], torch.zeros_like(end_row)
        layer = fast.layers[start_layer]
        pre = cache.resid_pre[start_layer][prompt[:, None], pos] if fast.parallel else resid
        resid = resid + mlp(fast, layer, mlp_input(fast, layer, pre, resid))
        first += 1
    for i in range(first, fast.n_layers):
        resid = block(fast, i, resid, prompt, pos, (cache.k[i], cache.v[i]), end_row if i == last else None, edit)
        if i == last:
            return resid[:, 0]
    return resid[n_idx, end_row]
