"""Every model computes right or is refused: the engine check, its fallback, the load-time check."""

import dataclasses
import warnings

import pandas as pd
import pytest
import torch
from conftest import _seeded, make_pair
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

from ioi import models, weights
from ioi.circuits import criteria as C
from ioi.engines import auto, check, fast, hooks, hooks_paths
from ioi.engines.state import engine_state
from ioi.metrics import logit_diff_from_end, run_end_logits


@pytest.fixture(scope="module")
def tiny_gpt_neo():
    """GPT-Neo with a local-attention layer whose window (4) is shorter than the prompts: a
    feature the fast engine does not implement."""
    config = GPTNeoConfig(
        num_layers=2, attention_types=[[["global", "local"], 1]], num_heads=4, hidden_size=64,
        max_position_embeddings=64, window_size=4,
    )
    bridge = models.from_hf_model(_seeded(lambda: GPTNeoForCausalLM(config)), weights.gpt2_tokenizer_directory())
    bridge.ioi_name = "tiny-gpt-neo"
    return bridge


def test_supported_models_pass_the_check(tiny_model):
    """GPT-2 and Llama: no unsupported feature, and fast logit differences equal the bridge's."""
    clean, corrupted = make_pair(tiny_model)
    assert check.unsupported_features(tiny_model) == []
    verdict = check.verify(tiny_model, clean, corrupted)
    assert verdict.fast, verdict.reason
    assert verdict.max_abs_diff < 1e-4


def test_loaders_declare_the_features_the_check_lets_through(tiny_gemma3, monkeypatch):
    """What a model may have beyond the core comes from its loader's declarations alone: Gemma 3
    passes because its loader implements its features; read by the processed-weights loader,
    which declares none, the same model is refused by name."""
    from ioi.engines.fast import loaders

    assert all(loader.implements <= set(check.FEATURES) for loader in loaders.LOADERS)
    assert check.unsupported_features(tiny_gemma3) == []
    monkeypatch.setattr(check, "loader_for", lambda model: loaders.LOADERS[-1])
    refused = set(check.unsupported_features(tiny_gemma3))
    assert {"Gemma 3", "query/key norms", "post-norms around attention and MLP"} <= refused


def test_local_attention_is_named_and_refused(tiny_gpt_neo):
    with pytest.raises(check.UnsupportedModelError, match="local .*attention.*tiny-gpt-neo"):
        check.check_supported(tiny_gpt_neo)


def test_the_fast_engine_would_be_wrong_on_gpt_neo(tiny_gpt_neo):
    """Why the refusal matters: the fast engine's numbers differ from the model's."""
    clean, _ = make_pair(tiny_gpt_neo)
    ours = fast.end_logit_diff(fast.as_fast(tiny_gpt_neo), clean.tokens, clean.end, clean.io_token, clean.s_token)
    theirs = logit_diff_from_end(run_end_logits(tiny_gpt_neo, clean), clean.io_token, clean.s_token)
    assert (ours - theirs).abs().max() > 1e-3


def test_unsupported_model_falls_back_to_hooks_with_one_warning(tiny_gpt_neo):
    """Every engine the study uses gives the hook reference's numbers on GPT-Neo, warning once."""
    clean, corrupted = make_pair(tiny_gpt_neo, n=8)
    engine_state(tiny_gpt_neo).fallback_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heads = auto.head_patching(tiny_gpt_neo, clean, corrupted)
        layers = auto.layer_patching(tiny_gpt_neo, clean, corrupted)
        paths = auto.path_patching(tiny_gpt_neo, clean, corrupted, "logits")
    fallbacks = [w for w in caught if "hook-based reference" in str(w.message)]
    assert len(fallbacks) == 1 and "local" in str(fallbacks[0].message)
    expected = hooks.head_patching(tiny_gpt_neo, clean, corrupted)
    torch.testing.assert_close(torch.tensor(heads.logit_diff.values), torch.tensor(expected.logit_diff.values))
    expected = hooks.layer_patching(tiny_gpt_neo, clean, corrupted)
    pd.testing.assert_frame_equal(layers, expected, check_exact=False, atol=1e-5, rtol=0)
    expected = hooks_paths.path_patching(tiny_gpt_neo, clean, corrupted, "logits")
    torch.testing.assert_close(torch.tensor(paths.logit_diff.values), torch.tensor(expected.logit_diff.values))


def test_unsupported_model_criteria_run_on_hooks(tiny_gpt_neo):
    """The circuit criteria on GPT-Neo run `run_circuit`, not the fast ablation engine."""
    clean, corrupted = make_pair(tiny_gpt_neo, n=8)
    ablation = C.mean_ablation(tiny_gpt_neo, clean, corrupted)
    assert isinstance(ablation, C.HookAblation)
    circuit = C.Circuit({"a": ((0, 1), (1, 2))}, {"a": "ALL"})
    got = C.circuit_logit_diffs(tiny_gpt_neo, [circuit], clean, ablation)[0]
    expected = C.run_circuit(tiny_gpt_neo, circuit, clean, C.group_means(tiny_gpt_neo, corrupted))
    torch.testing.assert_close(got, expected)


def test_a_fast_model_that_disagrees_is_caught():
    """Features alone do not decide: a fast model whose numbers are off fails the check."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    bridge = models.from_hf_model(_seeded(lambda: GPT2LMHeadModel(config), seed=3), weights.gpt2_tokenizer_directory())
    good = fast.as_fast(bridge)
    layer = dataclasses.replace(good.layers[1], b_O=good.layers[1].b_O + 0.05 * torch.randn_like(good.layers[1].b_O))
    engine_state(bridge).fast = dataclasses.replace(good, layers=(good.layers[0], layer))
    clean, corrupted = make_pair(bridge)
    verdict = check.verify(bridge, clean, corrupted)
    assert not verdict.fast and "differ" in verdict.reason


def test_load_time_check_catches_wrong_weight_processing(monkeypatch):
    """A bridge whose weight processing changes the logits is rebooted unprocessed, with a
    warning, and then computes what the Hugging Face model computes."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    hf = _seeded(lambda: GPT2LMHeadModel(config), seed=4).eval()
    tokens = torch.tensor([[464, 3290, 1110, 290, 1757, 1816, 284, 262]])
    with torch.no_grad():
        expected = hf(tokens).logits.clone()
    real = models.TransformerBridge.enable_compatibility_mode

    def mis_processing(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if not kwargs.get("no_processing"):
            with torch.no_grad():  # a processing bug: the last block's MLP output weights scaled
                self.original_model.transformer.h[-1].mlp.c_proj.weight.mul_(1.5)

    monkeypatch.setattr(models.TransformerBridge, "enable_compatibility_mode", mis_processing)
    with pytest.warns(models.ProcessingMismatchWarning, match="no_processing=True"):
        bridge = models.from_hf_model(hf, weights.gpt2_tokenizer_directory())
    with torch.no_grad():
        got = bridge(tokens)
    centred = lambda x: x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(centred(got), centred(expected), atol=1e-4, rtol=0)
