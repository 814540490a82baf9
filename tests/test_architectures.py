"""Each architecture the project accepts either computes exactly in the fast engines or is
refused by them and runs on the hook references: tiny random models of each, saved as local
Hugging Face directories and loaded by path, as a user would."""

import pytest
import torch
from conftest import _seeded, make_pair
from transformers import (
    AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig, GPTNeoXForCausalLM,
    OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from ioi import models
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


def test_gemma3_is_refused_by_name(tiny_gemma3):
    found = ", ".join(check.unsupported_features(tiny_gemma3))
    for feature in ("sliding-window", "query/key norms", "post-norms", "embedding scale"):
        assert feature in found


def test_gemma3_study_engines_fall_back_to_hooks(tiny_gemma3):
    """On Gemma 3 the study's head sweep is the hook reference's, and the clean run behind it
    is the Hugging Face model's."""
    clean, corrupted = make_pair(tiny_gemma3, n=6)
    with pytest.warns(UserWarning, match="hook-based reference"):
        got = auto.head_out_frame(tiny_gemma3, clean, corrupted)
    expected = hooks.patch_head_outputs(tiny_gemma3, clean, corrupted)
    torch.testing.assert_close(torch.tensor(got.logit_diff.values), torch.tensor(expected.logit_diff.values))
    with torch.inference_mode():
        ours = logit_diff(tiny_gemma3(clean.tokens), clean)
        original = Gemma3ForCausalLM.from_pretrained(tiny_gemma3.ioi_name).eval()  # its directory
        hf = logit_diff(original(clean.tokens).logits, clean)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)


def test_gemma3_direct_logit_attribution_is_refused(tiny_gemma3):
    """Gemma 3's heads pass through a post-attention norm: they have no additive direct share,
    and the attribution says so instead of returning numbers that do not add up."""
    from ioi.analyses import logit_attribution

    clean, _ = make_pair(tiny_gemma3, n=6)
    with pytest.raises(NotImplementedError, match="do not add up"):
        logit_attribution.per_prompt_attributions(tiny_gemma3, clean)
