"""Reading a model into a `FastModel`: one loader per way a bridge exposes its weights.

`LOADERS`, tried in order: Gemma 3's unprocessed Hugging Face modules, with the norms no
processing can fold (`_from_gemma3`), and the processed weights of any other bridge in
compatibility mode (GPT-2, GPT-NeoX, Llama, Qwen2, OPT-style blocks) as views of the parameters
the bridge itself computes with (`_from_processed`). Each declares the architecture features
(`ioi.engines.check.FEATURES`) its `FastModel` implements beyond the core that every one does
(pre-norm blocks, learned or rotary positions, GELU or gated MLPs, grouped-query attention);
`ioi.engines.check` refuses a model with any other. `as_fast` builds the fast model once per
bridge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ioi.engines.fast.model import MAX_ROTARY_POSITIONS, FastModel, Layer
from ioi.engines.state import engine_state

@dataclass(frozen=True)
class Loader:
    name: str
    reads: Callable  # bridge -> bool: whether this loader reads it
    load: Callable  # bridge -> FastModel
    implements: frozenset[str]  # of `ioi.engines.check.FEATURES`, beyond the core


def loader_for(bridge) -> Loader:
    return next(loader for loader in LOADERS if loader.reads(bridge))


def from_bridge(bridge) -> FastModel:
    # ordinary (not inference-mode) tensors, so that attribution patching can backpropagate
    with torch.inference_mode(False), torch.no_grad():
        return loader_for(bridge).load(bridge)


def _from_processed(bridge) -> FastModel:
    """The weights of a `TransformerBridge` in compatibility mode, as a `FastModel`.

    Each block's properties (`blocks[i].attn.W_Q`, ... `mlp.W_out`) are views of exactly the
    processed weights its own forward uses, so the fast model shares their memory rather than
    copying the model (a 1.5B model's copy would be 6 GB); bias-free models (Llama) expose no
    biases, so those are zeros here."""
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


def _from_gemma3(bridge) -> FastModel:
    """Gemma 3's unprocessed Hugging Face weights in TransformerLens shapes, with its norms'
    weights, per-layer rotary tables and attention windows: its norms after attention and MLP
    cannot be folded into any weight, so they are kept, with the others, as they are."""
    hf_model, dtype = bridge.original_model, bridge.W_E.dtype
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


LOADERS = (
    Loader("Gemma 3", is_gemma3, _from_gemma3, frozenset({
        "Gemma 3", "local (sliding-window) attention", "query/key norms", "post-norms around attention and MLP",
        "attention scale other than sqrt(d_head)",
    })),
    Loader("processed bridge", lambda bridge: True, _from_processed, frozenset()),
)


def as_fast(model_or_fast) -> FastModel:
    """A `FastModel` for a bridge (built once and kept with it: `ioi.engines.state`) or the
    `FastModel` itself."""
    if isinstance(model_or_fast, FastModel):
        return model_or_fast
    state = engine_state(model_or_fast)
    if state.fast is None:
        state.fast = from_bridge(model_or_fast)
    return state.fast


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
