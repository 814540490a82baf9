"""Exact activation patching, fast: recompute only what a patch can change.

Activation patching (Wang et al. 2022, §3; Meng et al. 2022) asks how much of a behaviour one
component carries: run the model on corrupted prompts, overwrite one component's activation with
its value from the clean run, and read the metric (here logit(IO) - logit(S) at END). Following
`transformer_lens.patching`, we patch CLEAN activations into the CORRUPTED run ("denoising") and
return the metric after each patch. Done naively that is one full forward per component: 144
forwards for GPT-2 small's heads, each paying for every layer, every position and a 50,257-wide
unembedding. Almost all of that work repeats the corrupted run. This module only does the rest:

1. The model as plain tensors. `FastModel` holds the weights the `TransformerBridge` exposes in
   compatibility mode (layer norms folded into the next linear map, writing weights and the
   unembedding centred, value biases folded into the output bias), so its forward is a handful of
   short functions: `embed`, `norm` (LayerNorm or RMSNorm without weights), `attention` (grouped
   query heads, rotary or learned positions) and `mlp` (GELU or SwiGLU). Gemma 3 is read from
   the Hugging Face model instead, with what no processing folds away: its norms' weights, the
   norms after attention and MLP, query/key norms and each layer's rotary table and window.
   It reproduces the bridge's logits to float rounding; `tests/test_fast.py` checks it against
   TransformerLens, and `ioi.engines.check` on every model before a study uses it.
2. One corrupted forward, cached. A patch at layer L leaves layers < L untouched, so every sweep
   starts from the cached corrupted residual stream at layer L.
3. Only the rows that change. A model is causal: a patch confined to positions >= p cannot change
   positions < p. `run_rows` therefore carries only the changed rows (a suffix of positions, or
   just END) through the later layers; they attend to the cached corrupted keys and values of all
   other positions, with the changed rows' own keys and values recomputed. Patching a head's
   output at END only needs one row per prompt; patching it at all positions needs the positions
   from the first token where the clean and corrupted prompts differ up to the last END.
4. Only the logits we read. The logit difference needs two columns of the unembedding,
   W_U[:, IO] - W_U[:, S], after the final norm, at END, never the whole vocabulary.
5. Many patches per forward. The variants of one layer (one per head, or per position) are
   stacked along the batch axis, since a few large matrix products beat many small ones on a CPU.

Every sweep returns the raw mean logit difference per component (`per_prompt=True` keeps the
prompt axis); normalise with `ioi.metrics.normalised`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import pandas as pd
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

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.layers[0].W_Q.shape[0]


def from_bridge(bridge) -> FastModel:
    # ordinary (not inference-mode) tensors, so that attribution patching can backpropagate
    with torch.inference_mode(False), torch.no_grad():
        return _from_bridge(bridge)


def _from_bridge(bridge) -> FastModel:
    """The weights of a `TransformerBridge` in compatibility mode, as a `FastModel`.

    Each block's properties (`blocks[i].attn.W_Q`, ... `mlp.W_out`) are views of exactly the
    processed weights its own forward uses, so the fast model shares their memory rather than
    copying the model (a 1.5B model's copy would be 6 GB); bias-free models (Llama) expose no
    biases, so those are zeros here. Gemma 3 is read from the Hugging Face modules the bridge
    runs instead: its norms after attention and MLP cannot be folded into any weight, so they
    are kept, with the others, as they are."""
    if is_gemma3(bridge):
        return _from_gemma3(bridge.original_model, bridge.W_E.dtype)
    cfg = bridge.cfg
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise NotImplementedError(f"normalization_type {cfg.normalization_type!r}")
    layers = tuple(Layer(**{name: _layer_weight(bridge, i, name) for name in BLOCK_WEIGHTS}) for i in range(cfg.n_layers))
    rotary = cfg.positional_embedding_type == "rotary"
    cos, sin = _rotary_tables(bridge) if rotary else (None, None)
    return FastModel(
        layers=layers,
        W_E=bridge.W_E.detach(),
        W_pos=None if rotary else bridge.W_pos.detach(),
        rotary_cos=cos,
        rotary_sin=sin,
        W_U=bridge.W_U.detach(),
        b_U=_stacked(bridge, "b_U") if hasattr(bridge, "b_U") else torch.zeros_like(bridge.W_U[0]),
        norm_type="RMS" if cfg.normalization_type.startswith("RMS") else "LN",
        eps=float(cfg.eps),
        act_fn=str(cfg.act_fn),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
    )


GEMMA3 = ("gemma3", "gemma3_text")


def is_gemma3(bridge) -> bool:
    hf = getattr(getattr(bridge, "original_model", None), "config", None)
    return getattr(hf, "model_type", None) in GEMMA3


def _from_gemma3(hf_model, dtype: torch.dtype) -> FastModel:
    """Gemma 3's unprocessed Hugging Face weights in TransformerLens shapes, with its norms'
    weights, per-layer rotary tables and attention windows."""
    config = hf_model.config.get_text_config()
    body = hf_model.model if hasattr(hf_model.model, "layers") else hf_model.model.language_model
    n_heads, n_kv, d_head = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n = min(int(config.max_position_embeddings), MAX_ROTARY_POSITIONS)
    probe, positions = torch.zeros(1, n, 1, dtype=dtype), torch.arange(n)[None]
    tables = {kind: tuple(t[0].to(dtype) for t in body.rotary_emb(probe, positions, kind))
              for kind in set(config.layer_types)}

    def w(linear: torch.nn.Module) -> Tensor:
        return linear.weight.detach().to(dtype)

    def per_head(linear, heads: int) -> Tensor:  # [heads * d_head, d_model] -> [heads, d_model, d_head]
        return w(linear).view(heads, d_head, -1).transpose(1, 2)

    zeros = functools.partial(torch.zeros, dtype=dtype)  # Gemma 3 has no biases
    d_model, d_mlp = config.hidden_size, config.intermediate_size
    layers = []
    for i, block in enumerate(body.layers):
        attn, mlp = block.self_attn, block.mlp
        kind = config.layer_types[i]
        layers.append(Layer(
            W_Q=per_head(attn.q_proj, n_heads), b_Q=zeros(n_heads, d_head),
            W_K=per_head(attn.k_proj, n_kv), b_K=zeros(n_kv, d_head),
            W_V=per_head(attn.v_proj, n_kv), b_V=zeros(n_kv, d_head),
            W_O=w(attn.o_proj).view(d_model, n_heads, d_head).permute(1, 2, 0), b_O=zeros(d_model),
            W_in=w(mlp.up_proj).T, b_in=zeros(d_mlp), W_gate=w(mlp.gate_proj).T,
            W_out=w(mlp.down_proj).T, b_out=zeros(d_model),
            attn_norm_w=w(block.input_layernorm), mlp_norm_w=w(block.pre_feedforward_layernorm),
            attn_post_norm_w=w(block.post_attention_layernorm),
            mlp_post_norm_w=w(block.post_feedforward_layernorm),
            q_norm_w=w(attn.q_norm), k_norm_w=w(attn.k_norm),
            rotary_cos=tables[kind][0], rotary_sin=tables[kind][1],
            window=config.sliding_window if kind == "sliding_attention" else None,
        ))
    embedding = w(body.embed_tokens)
    return FastModel(
        layers=tuple(layers),
        W_E=embedding,
        W_pos=None, rotary_cos=None, rotary_sin=None,
        W_U=w(hf_model.lm_head).T,
        b_U=torch.zeros(embedding.shape[0], dtype=dtype),
        norm_type="RMS",
        eps=float(config.rms_norm_eps),
        act_fn=str(config.hidden_activation),
        # as Gemma3TextScaledWordEmbedding: sqrt(d_model) as a float32 tensor, then the weights' dtype
        embed_scale=torch.tensor(config.hidden_size**0.5).to(dtype).item(),
        final_norm_w=w(body.norm),
        norm_offset=1.0,
        attn_scale=float(config.query_pre_attn_scalar) ** 0.5,
    )


def as_fast(model_or_fast) -> FastModel:
    """A `FastModel` for a bridge (built once and kept on it) or the `FastModel` itself."""
    if isinstance(model_or_fast, FastModel):
        return model_or_fast
    fast = getattr(model_or_fast, "_ioi_fast_model", None)
    if fast is None:
        fast = from_bridge(model_or_fast)
        model_or_fast._ioi_fast_model = fast  # weights are frozen in eval, so cache per bridge
    return fast


def _stacked(bridge, name: str) -> Tensor | None:
    try:
        return getattr(bridge, name).detach()
    except AttributeError:  # the bridge raises for parameters a bias-free checkpoint lacks
        return None


# Where each of a Layer's weights lives on a bridge block, and which weight a missing bias
# takes its shape from (None: d_model).
BLOCK_WEIGHTS = {"W_Q": "attn", "b_Q": "attn", "W_K": "attn", "b_K": "attn", "W_V": "attn", "b_V": "attn",
                 "W_O": "attn", "b_O": "attn", "W_in": "mlp", "b_in": "mlp", "W_gate": "mlp", "W_out": "mlp",
                 "b_out": "mlp"}
BIAS_SHAPE_OF = {"b_Q": "W_Q", "b_K": "W_K", "b_V": "W_V", "b_in": "W_in", "b_O": None, "b_out": None}


def _block_weight(bridge, i: int, name: str) -> Tensor | None:
    """Block i's weight `name` as the bridge computes with it: a view of its parameter."""
    try:
        value = getattr(getattr(bridge.blocks[i], BLOCK_WEIGHTS[name]), name)
    except AttributeError:  # the bridge raises for parameters a bias-free checkpoint lacks
        return None
    return None if value is None else value.detach()


def _layer_weight(bridge, i: int, name: str) -> Tensor | None:
    value = _block_weight(bridge, i, name)
    if value is not None or name == "W_gate":
        return value
    # a bias-free checkpoint: the missing bias is zero, shaped like the matching weight's output
    weight = BIAS_SHAPE_OF[name]
    shape = (bridge.cfg.d_model,) if weight is None else (lambda w: w.shape[:-2] + w.shape[-1:])(_block_weight(bridge, i, weight))
    return torch.zeros(shape, dtype=bridge.W_E.dtype, device=bridge.W_E.device)


def _rotary_tables(bridge) -> tuple[Tensor, Tensor]:
    """cos and sin per position from the Hugging Face model's own rotary module, so that any
    base frequency, scaling or partial width (Pythia rotates 25% of each head) it uses is
    reproduced exactly."""
    rotary = _rotary_module(bridge.original_model)
    n = min(int(bridge.cfg.n_ctx), MAX_ROTARY_POSITIONS)
    dtype = bridge.W_E.dtype
    probe = torch.zeros(1, n, 1, dtype=dtype, device=bridge.W_E.device)
    cos, sin = rotary(probe, torch.arange(n, device=probe.device)[None])
    return cos[0].to(dtype).detach(), sin[0].to(dtype).detach()


def _rotary_module(hf_model) -> torch.nn.Module:
    found = [m for name, m in hf_model.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb"]
    if len(found) != 1:
        raise NotImplementedError(f"{type(hf_model).__name__}: expected one rotary module, found {len(found)}")
    return found[0]


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


def attention_z(
    fast: FastModel,
    layer: Layer,
    x: Float[Tensor, "batch row d_model"],
    pos: Int[Tensor, "batch row"],
    k: Float[Tensor, "batch key kv_head d_head"],
    v: Float[Tensor, "batch key kv_head d_head"],
) -> Float[Tensor, "batch row head d_head"]:
    """Each row's heads attend causally over `k`, `v` (grouped-query attention)."""
    return attend(attention_pattern(fast, layer, queries(fast, layer, x, pos), k, pos), v)


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


def run_with_cache(fast: FastModel, tokens: Int[Tensor, "batch pos"], edit_z=None) -> Cache:
    """The full forward, keeping every activation a sweep needs. `edit_z(layer, z, prompt, pos)`,
    if given, replaces each layer's head outputs before they are used (e.g. mean-ablation)."""
    pos = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
    prompt = torch.arange(tokens.shape[0], device=tokens.device)
    acts = {name: [] for name in ("resid_pre", "z", "k", "v")}
    resid = embed(fast, tokens)
    for i, layer in enumerate(fast.layers):
        x = attn_input(fast, layer, resid)
        k, v = keys_values(fast, layer, x, pos)
        z = attention_z(fast, layer, x, pos, k, v)
        if edit_z is not None:
            z = edit_z(i, z, prompt, pos)
        for name, value in zip(acts, (resid, z, k, v)):
            acts[name].append(value)
        mid = resid + head_out(fast, layer, z)
        resid = mid + mlp(fast, layer, mlp_input(fast, layer, resid, mid))
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


# --- Recomputing only the rows a patch changes -----------------------------------------------


def run_rows(
    fast: FastModel,
    cache: Cache,
    start_layer: int,
    resid: Float[Tensor, "n row d_model"],
    prompt: Int[Tensor, " n"],
    pos: Int[Tensor, "n row"],
    end_row: Int[Tensor, " n"],
    after_attention: bool = True,
    edit_z=None,
) -> Float[Tensor, "n d_model"]:
    """Carry changed rows from layer `start_layer`'s residual stream (after its attention, or
    before it with after_attention=False) to the final residual at END (row `end_row`).

    Row r of variant n sits at absolute position pos[n, r] of prompt prompt[n]. Every position
    not among the rows is unchanged, so its keys and values are the cached ones; the rows' own
    keys and values are recomputed and written over them. After the last layer's keys and
    values only END is needed, so the last attention and MLP run on END alone. `edit_z` is as
    in `run_with_cache`. A change given after attention is a change to the attention output
    alone: the residual before it, which a parallel block's MLP reads, is the cached one."""
    n_idx = torch.arange(len(prompt), device=pos.device)
    last = fast.n_layers - 1
    for i in range(start_layer, fast.n_layers):
        layer = fast.layers[i]
        if i > start_layer or not after_attention:
            x = attn_input(fast, layer, resid)
            k, v = _with_rows(fast, layer, cache.k[i], cache.v[i], x, prompt, pos)
            if i == last:
                x, resid, pos = x[n_idx, end_row, None], resid[n_idx, end_row, None], pos[n_idx, end_row, None]
            z = attention_z(fast, layer, x, pos, k, v)
            if edit_z is not None:
                z = edit_z(i, z, prompt, pos)
            pre, resid = resid, resid + head_out(fast, layer, z)
        else:
            if i == last:
                resid, pos = resid[n_idx, end_row, None], pos[n_idx, end_row, None]
            pre = cache.resid_pre[i][prompt[:, None], pos] if fast.parallel else resid
        resid = resid + mlp(fast, layer, mlp_input(fast, layer, pre, resid))
    return resid[:, 0] if resid.shape[1] == 1 else resid[n_idx, end_row]


def _with_rows(fast, layer, cached_k, cached_v, x, prompt, pos):
    """The cached keys and values of each variant's prompt, with its rows' recomputed."""
    k_rows, v_rows = keys_values(fast, layer, x, pos)
    k, v = cached_k[prompt], cached_v[prompt]  # advanced indexing copies, so writing is safe
    n_idx = torch.arange(len(prompt), device=pos.device)[:, None]
    k[n_idx, pos], v[n_idx, pos] = k_rows, v_rows
    return k, v


@dataclass(frozen=True)
class Task:
    """A clean/corrupted pair and both runs' caches: what every sweep starts from."""

    fast: FastModel
    clean: Cache
    corrupted: Cache
    clean_tokens: Tensor
    corrupted_tokens: Tensor
    end: Tensor
    io_token: Tensor
    s_token: Tensor

    @property
    def batch(self) -> int:
        return len(self.end)

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    def first_change(self, prompts: Tensor) -> int:
        return first_change(self.clean_tokens[prompts], self.corrupted_tokens[prompts], self.end[prompts])


def first_change(
    clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"], end: Int[Tensor, " batch"]
) -> int:
    """The first position where any clean and corrupted prompt differ: before it both runs are
    the same, so no patch there (or of anything computed there) changes anything."""
    differs = (clean_tokens != corrupted_tokens).any(0).nonzero()
    return int(differs[0]) if len(differs) else int(end.min())


# The one result `reuse_last` keeps, whichever function computed it.
_kept: dict = {}


def reuse_last(compute):
    """Return `compute(fast, *tensors)`'s last result again while it is called with the same
    FastModel and equal tensors (compared by value, against copies). A study runs many sweeps on
    one clean/corrupted pair: they share its cached runs instead of each paying for them (two
    forwards, seconds on a real model). One result is kept across every function so decorated,
    and dropped before the next is computed, so it never adds to the memory of the next such
    computation (it is held until then: a cache of a study's size, not of a sweep's)."""

    @functools.wraps(compute)
    def wrapper(fast: FastModel, *tensors: Tensor):
        if not (_kept.get("compute") is compute and _kept["fast"] is fast and _equal(_kept["tensors"], tensors)):
            _kept.clear()
            value = compute(fast, *tensors)
            _kept.update(compute=compute, fast=fast, tensors=tuple(t.clone() for t in tensors), value=value)
        return _kept["value"]

    return wrapper


def _equal(kept: tuple[Tensor, ...], tensors: tuple[Tensor, ...]) -> bool:
    return len(kept) == len(tensors) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(kept, tensors)
    )


@reuse_last
@torch.inference_mode()
def cached_runs(
    fast: FastModel, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"]
) -> tuple[Cache, Cache]:
    """The clean and the corrupted run, cached (and reused: see `reuse_last`)."""
    return run_with_cache(fast, clean_tokens), run_with_cache(fast, corrupted_tokens)


def prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token) -> Task:
    fast = as_fast(model_or_fast)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError("clean and corrupted prompts must have the same shape, position by position")
    clean, corrupted = cached_runs(fast, clean_tokens, corrupted_tokens)
    return Task(fast, clean, corrupted, clean_tokens, corrupted_tokens, end, io_token, s_token)


def _rows(task: Task, prompts: Tensor, n_var: int, start: int | None):
    """Which prompt each of n_var x len(prompts) variants belongs to, its rows' positions
    (`start` to the last END, or END alone when start is None) and END's row."""
    prompt = prompts.repeat(n_var)
    end = task.end[prompt]
    if start is None:
        return prompt, end[:, None], torch.zeros_like(end)
    pos = torch.arange(start, int(end.max()) + 1).expand(len(prompt), -1)
    return prompt, pos, (end - start).clamp(min=0)  # END < start: see _logit_diff


def _resid_mid_patched(
    task: Task, layer: int, prompts: Tensor, deltas: Float[Tensor, "variant batch pos d_model"], start: int | None
) -> Float[Tensor, "variant batch"]:
    """Logit difference at END after adding each variant's delta to layer `layer`'s residual
    after attention (a head's or the attention layer's output change) and running on."""
    n_var = deltas.shape[0]
    prompt, pos, end_row = _rows(task, prompts, n_var, start)
    rows = torch.arange(len(prompt))[:, None]
    resid = task.corrupted.resid_mid(layer, (prompt[:, None], pos)) + deltas.flatten(0, 1)[rows, pos]
    final = run_rows(task.fast, task.corrupted, layer, resid, prompt, pos, end_row)
    return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))


def _resid_pre_patched(
    task: Task, layer: int, prompts: Tensor, resid_pre: Float[Tensor, "variant batch pos d_model"], start: int
) -> Float[Tensor, "variant batch"]:
    """Logit difference at END for residual streams before `layer` that differ from the
    corrupted run's at positions >= `start` only."""
    n_var = resid_pre.shape[0]
    prompt, pos, end_row = _rows(task, prompts, n_var, start)
    resid = resid_pre.flatten(0, 1)[torch.arange(len(prompt))[:, None], pos]
    if layer == task.fast.n_layers:
        final = resid[torch.arange(len(prompt)), end_row]
        return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))
    final = run_rows(task.fast, task.corrupted, layer, resid, prompt, pos, end_row, after_attention=False)
    return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))


def _logit_diff(task: Task, final: Tensor, prompt: Tensor, start: int | None) -> Tensor:
    patched = logit_diff_at(task.fast, final, task.io_token[prompt], task.s_token[prompt])
    if start is None:
        return patched
    # a prompt that ends before the patched position is not changed by it
    return torch.where(task.end[prompt] < start, _unpatched(task)[prompt], patched)


def _unpatched(task: Task) -> Float[Tensor, " batch"]:
    final = task.corrupted.resid_final[torch.arange(task.batch), task.end]
    return logit_diff_at(task.fast, final, task.io_token, task.s_token)


def length_groups(end: Int[Tensor, " batch"]) -> list[Int[Tensor, " prompts"]]:
    """Prompts grouped by END, so that no row is spent on another prompt's padding."""
    return [(end == e).nonzero()[:, 0] for e in end.unique()]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.inference_mode()
def head_out_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    positions: Positions = "all",
    batch_size: int = 512,
    per_prompt: bool = False,
) -> Float[Tensor, "layer head *batch"]:
    """Logit difference at END after patching each head's clean output (`hook_z`) into the
    corrupted run, at all positions (as TransformerLens's `get_act_patch_attn_head_out_all_pos`)
    or at each prompt's own END only. `batch_size` bounds the patched prompts run at once."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast = task.fast
    out = torch.empty(fast.n_layers, fast.n_heads, task.batch, dtype=fast.W_E.dtype)
    # END-only patches change one row per prompt, whatever its length: no need to group.
    groups = [torch.arange(task.batch)] if positions == "end" else length_groups(task.end)
    for prompts in groups:
        start = None if positions == "end" else task.first_change(prompts)
        heads_per_chunk = max(1, batch_size // len(prompts))
        for i, layer in enumerate(fast.layers):
            dz = task.clean.z[i][prompts] - task.corrupted.z[i][prompts]  # [batch pos head d_head]
            for heads in _chunks(fast.n_heads, heads_per_chunk):
                # patching a head's z adds (clean z - corrupted z) @ W_O to the attention output
                deltas = head_out_changes(fast, layer, task.corrupted.z[i][prompts], dz, heads)
                out[i, heads][:, prompts] = _resid_mid_patched(task, i, prompts, deltas, start)
    return out if per_prompt else out.mean(-1)


@torch.inference_mode()
def resid_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    component: Literal["resid_pre", "attn_out", "mlp_out"] = "resid_pre",
    per_prompt: bool = False,
) -> Float[Tensor, "layer pos *batch"]:
    """Logit difference at END after patching a clean activation into the corrupted run at one
    absolute position, per layer: the residual stream before the layer (`resid_pre`, as
    TransformerLens's `get_act_patch_resid_pre`), or the layer's `attn_out` or `mlp_out`
    (`get_act_patch_attn_out`, `get_act_patch_mlp_out`)."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast, everyone = task.fast, torch.arange(task.batch)
    out = torch.empty(fast.n_layers, task.n_pos, task.batch, dtype=fast.W_E.dtype)
    # Patches before the first difference or after the last END change nothing we read.
    out[:] = _unpatched(task)
    for i in range(fast.n_layers):
        for p in range(task.first_change(everyone), int(task.end.max()) + 1):
            out[i, p] = _position_patch(task, component, i, p)[0]
    return out if per_prompt else out.mean(-1)


def _position_patch(task: Task, component: str, layer: int, p: int) -> Float[Tensor, "1 batch"]:
    """One layer's clean `component` patched in at position p, all prompts at once."""
    everyone = torch.arange(task.batch)
    clean, corrupted = task.clean, task.corrupted
    if component == "resid_pre":
        patched = corrupted.resid_pre[layer].clone()
        patched[:, p] = clean.resid_pre[layer][:, p]
        return _resid_pre_patched(task, layer, everyone, patched[None], p)
    diff = torch.zeros_like(corrupted.resid_pre[layer])
    at = (slice(None), slice(p, p + 1))
    diff[at] = getattr(clean, component)(layer, at) - getattr(corrupted, component)(layer, at)
    if component == "attn_out":
        return _resid_mid_patched(task, layer, everyone, diff[None], p)
    # an MLP-output patch is a change to the residual stream before the next layer
    after = corrupted.resid_pre[layer + 1] if layer + 1 < task.fast.n_layers else corrupted.resid_final
    return _resid_pre_patched(task, layer + 1, everyone, (after + diff)[None], p)


@torch.inference_mode()
def layer_out_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    component: Literal["attn_out", "mlp_out"] = "attn_out",
    per_prompt: bool = False,
) -> Float[Tensor, "layer *batch"]:
    """Logit difference at END after patching a whole layer's clean attention or MLP output
    into the corrupted run at every position (as `ioi.engines.hooks.patch_layer_outputs`)."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast, clean, corrupted = task.fast, task.clean, task.corrupted
    out = torch.empty(fast.n_layers, task.batch, dtype=fast.W_E.dtype)
    for prompts in length_groups(task.end):
        start = task.first_change(prompts)
        for i in range(fast.n_layers):
            diff = getattr(clean, component)(i, prompts) - getattr(corrupted, component)(i, prompts)
            if component == "attn_out":
                out[i, prompts] = _resid_mid_patched(task, i, prompts, diff[None], start)[0]
            else:  # an MLP output patch changes the residual stream before the next layer
                after = corrupted.resid_pre[i + 1] if i + 1 < fast.n_layers else corrupted.resid_final
                out[i, prompts] = _resid_pre_patched(task, i + 1, prompts, (after[prompts] + diff)[None], start)[0]
    return out if per_prompt else out.mean(-1)


HeadInput = Literal["q", "k", "v", "pattern"]


@torch.inference_mode()
def head_input_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    activation: HeadInput,
    heads: list[tuple[int, int]],
    per_prompt: bool = False,
) -> Float[Tensor, "item *batch"]:
    """Logit difference at END after patching one head's clean queries, keys, values or
    attention pattern into the corrupted run at every position, for each (layer, head) in
    `heads` (as `ioi.engines.hooks.patch_head_queries`, ...). Keys and values are indexed by key/value
    head: under grouped-query attention patching one changes every query head of its group."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    fast = task.fast
    out = torch.empty(len(heads), task.batch, dtype=fast.W_E.dtype)
    for prompts in length_groups(task.end):
        start = task.first_change(prompts)
        for j, (i, head) in enumerate(heads):
            z = _attention_with_clean(task, i, prompts, activation, head)
            delta = head_out(fast, fast.layers[i], z) - head_out(fast, fast.layers[i], task.corrupted.z[i][prompts])
            out[j, prompts] = _resid_mid_patched(task, i, prompts, delta[None], start)[0]
    return out if per_prompt else out.mean(-1)


def _attention_with_clean(task: Task, i: int, prompts: Tensor, activation: HeadInput, head: int):
    """Layer i's head outputs on the corrupted prompts with one head's `activation` clean."""
    fast, layer = task.fast, task.fast.layers[i]
    pos = torch.arange(task.n_pos).expand(len(prompts), -1)
    runs = {}
    for name, cache in (("clean", task.clean), ("corrupted", task.corrupted)):
        x = attn_input(fast, layer, cache.resid_pre[i][prompts])
        runs[name] = {"q": queries(fast, layer, x, pos), "k": cache.k[i][prompts], "v": cache.v[i][prompts]}
    q, k, v = (runs["corrupted"][name].clone() for name in ("q", "k", "v"))
    if activation == "pattern":
        pattern = attention_pattern(fast, layer, q, k, pos)
        pattern[:, head] = attention_pattern(fast, layer, runs["clean"]["q"], runs["clean"]["k"], pos)[:, head]
        return attend(pattern, v)
    patched = {"q": q, "k": k, "v": v}[activation]
    patched[:, :, head] = runs["clean"][activation][:, :, head]
    return attend(attention_pattern(fast, layer, q, k, pos), v)


# --- Tidy results for the report -------------------------------------------------------------


def sweep_frame(values: Float[Tensor, "layer component"], component: Literal["head", "pos"]) -> pd.DataFrame:
    """A [layer, head] or [layer, pos] sweep as rows (layer, head | pos, logit_diff)."""
    layers, comps = torch.meshgrid(
        torch.arange(values.shape[0]), torch.arange(values.shape[1]), indexing="ij"
    )
    return pd.DataFrame(
        {
            "layer": layers.flatten().numpy(),
            component: comps.flatten().numpy(),
            "logit_diff": values.detach().flatten().double().numpy(),
        }
    )


def head_out_frame(model, clean, corrupted, positions: Positions = "all", **kwargs) -> pd.DataFrame:
    """`head_out_sweep` on two `IOIDataset`s, as a tidy frame (layer, head, logit_diff)."""
    values = head_out_sweep(
        model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token,
        positions=positions, **kwargs,
    )
    return sweep_frame(values, "head")


def resid_frame(model, clean, corrupted, **kwargs) -> pd.DataFrame:
    """`resid_sweep` on two `IOIDataset`s, as a tidy frame (layer, pos, logit_diff)."""
    values = resid_sweep(
        model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token, **kwargs
    )
    return sweep_frame(values, "pos")


@torch.inference_mode()
def resid_named_sweep(
    model_or_fast,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    end: Int[Tensor, " batch"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
    positions: Int[Tensor, "name batch"],
    per_prompt: bool = False,
) -> Float[Tensor, "layer name *batch"]:
    """Logit difference at END after patching the clean residual stream before each layer into
    the corrupted run at each prompt's own position `positions[name, prompt]` (its S2, its END,
    ...). Rows are carried from the earliest of those positions, so a late position (END) costs
    a fraction of an early one."""
    task = prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token)
    out = torch.empty(task.fast.n_layers, len(positions), task.batch, dtype=task.fast.W_E.dtype)
    for prompts in length_groups(task.end):  # so that a patch at END carries END alone
        rows = torch.arange(len(prompts))
        for layer in range(task.fast.n_layers):
            for i, at in enumerate(positions[:, prompts]):
                patched = task.corrupted.resid_pre[layer][prompts]
                patched[rows, at] = task.clean.resid_pre[layer][prompts, at]
                out[layer, i, prompts] = _resid_pre_patched(task, layer, prompts, patched[None], int(at.min()))[0]
    return out if per_prompt else out.mean(-1)


def resid_named_frame(model, clean, corrupted, positions=("IO", "S1", "S1+1", "S2", "END")) -> pd.DataFrame:
    """`resid_named_sweep` on two `IOIDataset`s at their named positions, as a tidy frame
    (layer, position, logit_diff); the same experiment as `ioi.engines.hooks.patch_residual`."""
    at = torch.stack([clean.positions[name] for name in positions])
    values = resid_named_sweep(
        model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token, at
    )
    return pd.DataFrame(
        [{"layer": layer, "position": name, "logit_diff": values[layer, i].item()}
         for layer in range(values.shape[0]) for i, name in enumerate(positions)]
    )


def layer_out_frame(model, clean, corrupted) -> pd.DataFrame:
    """`layer_out_sweep` for attention and MLP outputs, as a tidy frame (layer, logit_diff,
    component) like `ioi.engines.hooks.patch_layer_outputs`."""
    args = (model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)
    frames = []
    for component in ("attn", "mlp"):
        values = layer_out_sweep(*args, component=f"{component}_out")
        frames.append(pd.DataFrame({"layer": range(len(values)), "logit_diff": values.double().numpy(),
                                    "component": component}))
    return pd.concat(frames, ignore_index=True)


def head_input_frame(model, clean, corrupted, heads: list[tuple[int, int]]) -> pd.DataFrame:
    """`head_input_sweep` of queries, keys, values and patterns of `heads` (query heads; keys
    and values are reported per key/value head, once per group), as a tidy frame (layer, head,
    logit_diff, activation) like the `ioi.engines.hooks.patch_head_*` sweeps."""
    args = (model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)
    group = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    frames = []
    for activation in ("q", "k", "v", "pattern"):
        items = sorted({(l, h // group) for l, h in heads}) if activation in ("k", "v") else list(heads)
        values = head_input_sweep(*args, activation=activation, heads=items)
        frames.append(pd.DataFrame({"layer": [l for l, _ in items], "head": [h for _, h in items],
                                    "logit_diff": values.double().numpy(), "activation": activation}))
    return pd.concat(frames, ignore_index=True)
