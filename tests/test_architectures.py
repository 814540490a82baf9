"""Each architecture the project accepts either computes exactly in the fast engines or is
refused by them and runs on the hook references: tiny random models of each, saved as local
Hugging Face directories and loaded by path, as a user would."""

import pytest
import torch
from conftest import _seeded, make_pair
from transformers import (
    AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM,
    OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from ioi import models, weights
from ioi.engines import auto, check, fast, hooks
from ioi.metrics import logit_diff

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)

FAST = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=50304, num_key_value_heads=2, **SMALL)),
    "opt": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=50304, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, rotary_pct=0.25, **SMALL)),
}


def _load(tmp_path_factory, name, build):
    """The model saved with GPT-2's tokenizer as a local directory, loaded by its path."""
    directory = tmp_path_factory.mktemp(name)
    _seeded(build).save_pretrained(directory)
    AutoTokenizer.from_pretrained(weights.gpt2_tokenizer_directory()).save_pretrained(directory)
    return models.load_model(str(directory))


@pytest.fixture(scope="module", params=sorted(FAST))
def fast_model(request, tmp_path_factory):
    return _load(tmp_path_factory, request.param, FAST[request.param])


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """Gemma 3 (text): sliding-window and global layers, q/k norms, pre- and post-norms."""
    config = Gemma3TextConfig(
        vocab_size=50304, head_dim=16, num_key_value_heads=1, sliding_window=4, **SMALL,
    )
    return _load(tmp_path_factory, "gemma3", lambda: Gemma3ForCausalLM(config))


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """Gemma (v1): embedding scale and (1 + w) norms like Gemma 3, but not implemented here."""
    config = GemmaConfig(vocab_size=50304, head_dim=16, num_key_value_heads=1, **SMALL)
    return _load(tmp_path_factory, "gemma", lambda: GemmaForCausalLM(config))


def test_fast_logits_equal_the_bridge(fast_model):
    """Qwen2, OPT, GPT-NeoX: the fast model's full logits are the bridge's."""
    clean, _ = make_pair(fast_model)
    with torch.inference_mode():
        expected = fast_model(clean.tokens)
    got = fast.logits(fast.as_fast(fast_model), clean.tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert check.verify(fast_model, clean).fast


def test_fast_head_sweep_equals_hooks(fast_model):
    clean, corrupted = make_pair(fast_model, n=8)
    got = auto.head_patching(fast_model, clean, corrupted)
    expected = hooks.head_patching(fast_model, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(expected.logit_diff.values), atol=1e-4, rtol=0)


def test_gemma3_is_exact_in_the_fast_engines(tiny_gemma3):
    """Loaded from its directory as a user would: the fast engines pass the check, their full
    logits are the Hugging Face model's, and the study's head sweep is the hook reference's."""
    clean, corrupted = make_pair(tiny_gemma3, n=6)
    assert check.unsupported_features(tiny_gemma3) == [] and check.verify(tiny_gemma3, clean, corrupted).fast
    with torch.inference_mode():
        original = Gemma3ForCausalLM.from_pretrained(tiny_gemma3.ioi_name).eval()  # its directory
        expected = original(clean.tokens).logits
    # the bridge centres the unembedding (logits move by a constant per position): compare log-probabilities
    got = fast.logits(fast.as_fast(tiny_gemma3), clean.tokens)
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1), atol=1e-4, rtol=0)
    got = auto.head_patching(tiny_gemma3, clean, corrupted)
    reference = hooks.head_patching(tiny_gemma3, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(reference.logit_diff.values), atol=1e-4, rtol=0)


def test_gemma_v1_is_refused_and_falls_back_to_hooks(tiny_gemma):
    """Gemma (v1) shares Gemma 3's embedding scale and norms but not its layout: the fast
    engines name it and refuse, and the study runs the hook reference with one warning."""
    assert "gemma" in ", ".join(check.unsupported_features(tiny_gemma))
    clean, corrupted = make_pair(tiny_gemma, n=6)
    with pytest.warns(UserWarning, match="hook-based reference"):
        got = auto.head_patching(tiny_gemma, clean, corrupted)
    expected = hooks.head_patching(tiny_gemma, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(expected.logit_diff.values))


def test_gemma3_direct_logit_attributions_add_up(tiny_gemma3):
    """Behind Gemma 3's post-attention norm, with its scale frozen, the heads' direct shares
    (with embeddings and MLPs) add up to every prompt's logit difference, and a layer's heads
    to the share of its whole attention output."""
    from ioi.analyses import logit_attribution
    from ioi.engines.hooks import run_with_cache

    clean, _ = make_pair(tiny_gemma3, n=6)
    per_prompt = logit_attribution.per_prompt_attributions(tiny_gemma3, clean)  # checks the sum itself
    with torch.inference_mode():
        expected = logit_diff(tiny_gemma3(clean.tokens), clean).double().numpy()
    assert abs(per_prompt.groupby("prompt_index").dla.sum().to_numpy() - expected).max() < 1e-4
    weights = fast.as_fast(tiny_gemma3)
    n_layers = tiny_gemma3.cfg.n_layers
    names = [f"blocks.{l}.{n}" for l in range(n_layers) for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")]
    _, cache = run_with_cache(tiny_gemma3, clean, names)
    at = torch.arange(len(clean)), clean.end
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][at]
    direction = (weights.W_U[:, clean.io_token] - weights.W_U[:, clean.s_token]).T * (1 + weights.final_norm_w)
    for layer in range(n_layers):
        attn = cache[f"blocks.{layer}.hook_resid_mid"][at] - cache[f"blocks.{layer}.hook_resid_pre"][at]
        whole = (attn * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + weights.eps) * direction).sum(-1)
        heads = per_prompt[(per_prompt.layer == layer) & per_prompt.component.isin(["head", "attn_bias"])]
        assert abs(heads.groupby("prompt_index").dla.sum().to_numpy() - whole.double().numpy()).max() < 1e-4


def test_gemma3_copy_logits_are_its_modules(tiny_gemma3):
    """A head's copy-score logits on Gemma 3 are what its own Hugging Face modules give for the
    head's write alone: input norm, values, the head's slice of o_proj, post-attention norm,
    final norm, unembedding."""
    from ioi.analyses.head_scores import _copy_inputs

    x = torch.randn(5, tiny_gemma3.cfg.d_model)
    hf = tiny_gemma3.original_model
    layer, head, d_head = 1, 3, 16
    block = hf.model.layers[layer]
    with torch.no_grad():
        v = block.self_attn.v_proj(block.input_layernorm(x))  # one key/value head
        o = block.self_attn.o_proj.weight[:, head * d_head:(head + 1) * d_head]
        expected = hf.lm_head(hf.model.norm(block.post_attention_layernorm(v @ o.T)))
    unembedded, W_U, b_U = _copy_inputs(tiny_gemma3, x)
    got = unembedded(layer, head) @ W_U + b_U
    torch.testing.assert_close(got.log_softmax(-1), expected.log_softmax(-1), atol=1e-4, rtol=0)
