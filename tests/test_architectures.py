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

from ioi import models
from ioi.engines import auto, check, fast, hooks

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
    AutoTokenizer.from_pretrained(models.gpt2_tokenizer_directory()).save_pretrained(directory)
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
    got = auto.head_out_frame(fast_model, clean, corrupted)
    expected = hooks.patch_head_outputs(fast_model, clean, corrupted)
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
    got = auto.head_out_frame(tiny_gemma3, clean, corrupted)
    reference = hooks.patch_head_outputs(tiny_gemma3, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(reference.logit_diff.values), atol=1e-4, rtol=0)


def test_gemma_v1_is_refused_and_falls_back_to_hooks(tiny_gemma):
    """Gemma (v1) shares Gemma 3's embedding scale and norms but not its layout: the fast
    engines name it and refuse, and the study runs the hook reference with one warning."""
    assert "gemma" in ", ".join(check.unsupported_features(tiny_gemma))
    clean, corrupted = make_pair(tiny_gemma, n=6)
    with pytest.warns(UserWarning, match="hook-based reference"):
        got = auto.head_out_frame(tiny_gemma, clean, corrupted)
    expected = hooks.patch_head_outputs(tiny_gemma, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(expected.logit_diff.values))


def test_gemma3_direct_logit_attribution_is_refused(tiny_gemma3):
    """Gemma 3's heads pass through a post-attention norm: they have no additive direct share,
    and the attribution says so instead of returning numbers that do not add up."""
    from ioi.analyses import logit_attribution

    clean, _ = make_pair(tiny_gemma3, n=6)
    with pytest.raises(NotImplementedError, match="do not add up"):
        logit_attribution.per_prompt_attributions(tiny_gemma3, clean)
