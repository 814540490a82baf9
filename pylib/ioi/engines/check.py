"""Does the fast engine compute what the model computes? Asked once per model, before it is used.

`ioi.engines.fast` rebuilds a transformer from plain tensors: it is exact only for the
architecture features it implements. A feature it does not implement (GPT-Neo's local attention,
Gemma 2's attention soft-capping, ...) would not raise an error: the numbers would just be wrong.
So before a study uses the fast engines on a model, two checks decide:

1. Features, up front (`unsupported_features`): the Hugging Face config and module names are
   read for every feature beyond the core that the fast engine implements for all (`FEATURES`);
   those the model's loader does not declare (`ioi.engines.fast.loaders.LOADERS`) are named.
2. Numbers (`verify`): on the study's own clean and corrupted prompts, the fast engine's logit
   difference at END must equal the bridge's, prompt by prompt, to float tolerance.

Either failing gives a `Verdict` with `fast=False` and its reason; `ioi.engines.auto` then runs
the hook-based reference engines instead, with one warning: slower, never wrong. A verdict is
kept with the model (`ioi.engines.state`), per dataset, so the check costs one forward per study.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ioi.engines.fast.loaders import loader_for
from ioi.engines.state import engine_state

# float32 logits of a few units agree to ~1e-5 when the computation is the same; a missing
# feature moves them by 1e-2 or more (GPT-Neo's local attention: 0.03; Gemma's embedding scale: 0.7)
TOLERANCE = 1e-3

# Activations and norms `fast._act` and `fast.norm` implement.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "silu", "swish", "relu")
NORMS = ("LN", "LNPre", "RMS", "RMSPre")


class UnsupportedModelError(NotImplementedError):
    """The fast engine does not implement a feature of this model; the message names it."""


@dataclass(frozen=True)
class Verdict:
    fast: bool  # True: the fast engines compute this model's numbers
    reason: str  # why not, or what was checked
    max_abs_diff: float  # largest |fast - bridge| logit difference at END (nan if not run)


def hf_config(model):
    original = getattr(model, "original_model", None)
    return getattr(original, "config", None)


# Features beyond the core, by the name a refusal gives; a loader declares those it implements.
FEATURES = (
    "attention scale other than sqrt(d_head)", "local (sliding-window) attention", "attn logit softcapping",
    "final logit softcapping", "unscaled attention scores", "Gemma 3", "parallel attention and MLP",
    "post-layer-norm blocks", "projected word embeddings", "GPT-2 attention rescaling by layer",
    "ALiBi attention biases", "query/key norms", "post-norms around attention and MLP",
)


def unsupported_features(model) -> list[str]:
    """Every architecture feature of `model` (a bridge) the fast engine does not implement: a
    norm, activation or position scheme outside the core, or one of `FEATURES` that its loader
    does not declare."""
    cfg, hf = model.cfg, hf_config(model)
    found = []
    if cfg.normalization_type not in NORMS:
        found.append(f"normalization {cfg.normalization_type!r}")
    if str(cfg.act_fn) not in ACTIVATIONS:
        found.append(f"activation {cfg.act_fn!r}")
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        found.append(f"positional embedding {cfg.positional_embedding_type!r}")
    features = []
    if not getattr(cfg, "use_attn_scale", True) or not _default_attn_scale(cfg):
        features.append("attention scale other than sqrt(d_head)")
    if hf is not None:
        features += _hf_features(model, hf)
    implemented = loader_for(model).implements
    return found + [f for f in features if f not in implemented]


def _default_attn_scale(cfg) -> bool:
    scale = getattr(cfg, "attn_scale", None)  # the bridge's config says -1 for the default
    return scale is None or scale <= 0 or math.isclose(float(scale), math.sqrt(cfg.d_head), rel_tol=1e-6)


def _hf_features(model, hf) -> list[str]:
    """The features of `FEATURES` (or another Gemma's architecture) that the Hugging Face config
    and module names show."""
    found = []
    kind = getattr(hf, "model_type", "?")
    types = set(getattr(hf, "attention_layers", None) or []) | set(getattr(hf, "layer_types", None) or [])
    if {"local", "sliding_attention"} & types or getattr(hf, "use_sliding_window", False):
        found.append("local (sliding-window) attention")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf, name, None) is not None:
            found.append(f"{name.replace('_', ' ')}")
    if kind == "gpt_neo":  # its attention scores are not divided by sqrt(d_head)
        found.append("unscaled attention scores")
    if kind in ("gemma3", "gemma3_text"):
        found.append("Gemma 3")  # its embedding scale and (1 + w) norms
    elif kind.startswith("gemma"):
        found.append(f"{kind}'s architecture (only Gemma 3 is implemented)")
    if getattr(hf, "parallel_attn", False) and kind != "gpt_neox":  # NeoX's is implemented
        found.append("parallel attention and MLP")
    if getattr(hf, "do_layer_norm_before", True) is False:
        found.append("post-layer-norm blocks")
    projected = getattr(hf, "word_embed_proj_dim", None)
    if projected is not None and projected != hf.hidden_size:
        found.append("projected word embeddings")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        found.append("GPT-2 attention rescaling by layer")
    if getattr(hf, "alibi", False) or kind in ("bloom", "mpt"):
        found.append("ALiBi attention biases")
    modules = [name.rsplit(".", 1)[-1] for name, _ in model.original_model.named_modules()]
    if {"q_norm", "k_norm", "q_layernorm", "k_layernorm"} & set(modules):
        found.append("query/key norms")
    if "post_feedforward_layernorm" in modules:
        found.append("post-norms around attention and MLP")
    return found


def check_supported(model) -> None:
    """Raise `UnsupportedModelError` naming every feature the fast engine lacks."""
    error = unsupported_error(unsupported_features(model), getattr(model, "ioi_name", type(model).__name__))
    if error is not None:
        raise error


def unsupported_error(found: list[str], model_name: str) -> UnsupportedModelError | None:
    """The error naming the features in `found` (from `unsupported_features`); None if none."""
    if not found:
        return None
    return UnsupportedModelError(
        f"The fast engines do not implement {', '.join(found)} (model {model_name}); "
        "use the hook-based engines in ioi.engines.hooks and ioi.engines.hooks_paths."
    )


def verify(model, *datasets, tolerance: float = TOLERANCE) -> Verdict:
    """The verdict for `model` on `datasets` (kept on the model: computed once per dataset)."""
    from ioi.cache import dataset_fingerprint

    kept = engine_state(model).verdicts
    key = (tolerance, *map(dataset_fingerprint, datasets))
    if key not in kept:
        kept[key] = _verify(model, datasets, tolerance)
    return kept[key]


def _verify(model, datasets, tolerance: float) -> Verdict:
    from ioi.engines import fast
    from ioi.metrics import logit_diff_from_end, run_end_logits

    found = unsupported_features(model)
    if found:
        return Verdict(False, "it does not implement " + ", ".join(found), math.nan)
    try:
        fast_model = fast.as_fast(model)
    except (NotImplementedError, AttributeError, KeyError, ValueError) as error:
        return Verdict(False, f"its weights could not be read ({error})", math.nan)
    worst, scale = 0.0, 1.0
    with torch.inference_mode():
        for data in datasets:
            ours = fast.end_logit_diff(fast_model, data.tokens, data.end, data.io_token, data.s_token)
            theirs = logit_diff_from_end(run_end_logits(model, data), data.io_token, data.s_token)
            worst = max(worst, float((ours - theirs).abs().max()))
            scale = max(scale, float(theirs.abs().max()))
    if not worst <= tolerance * scale:  # also catches nan
        return Verdict(False, f"its logit differences differ from the model's by {worst:.2g}", worst)
    return Verdict(True, f"agrees with the model to {worst:.1g}", worst)


def use_fast(model, *datasets) -> bool:
    """Whether the fast engines may run `model` on `datasets`; warns once per model when not."""
    verdict, state = verify(model, *datasets), engine_state(model)
    if not verdict.fast and not state.fallback_warned:
        state.fallback_warned = True
        warnings.warn(
            f"{getattr(model, 'ioi_name', 'this model')}: the fast engines are not used because "
            f"{verdict.reason}; running the hook-based reference engines instead (slower, exact).",
            stacklevel=3,
        )
    return verdict.fast
