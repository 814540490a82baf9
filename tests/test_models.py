"""Model loading: known names, clear errors for bad input, offline models that work."""

import contextlib

import pytest
import torch
from transformers import (
    AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

from ioi import models, weights


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Known models: .*smollm2-135m"):
        models.load_model("gpt-5-turbo")


def test_hub_model_offline_fails_at_once_with_instructions(monkeypatch, tmp_path):
    """Without the hub and without cached weights, loading says how to get the weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelUnavailableError, match="(?s)save_pretrained.*smollm2-135m"):
        models.load_model("gpt2-medium")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(models.ModelUnavailableError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_random_gpt2_has_the_paper_models_shape():
    """gpt2-small-random: 12 layers x 12 heads, d_model 768, GPT-2's tokenizer (" Mary" = 5335)."""
    model = models.load_model("gpt2-small-random")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model) == (12, 12, 768)
    assert model.tokenizer(" Mary", add_special_tokens=False)["input_ids"] == [5335]


def test_local_directory_loads(tmp_path):
    """A saved Hugging Face directory loads by its path and computes what the in-memory
    model computes."""
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(weights.gpt2_tokenizer_directory()).save_pretrained(tmp_path)
    from_disk = models.load_model(str(tmp_path))
    in_memory = models.from_hf_model(GPT2LMHeadModel.from_pretrained(tmp_path), tmp_path)
    tokens = from_disk.to_tokens("When Mary and John went to the store, John gave a drink to")
    assert (from_disk(tokens) - in_memory(tokens)).abs().max() < 1e-4


def test_bos_follows_the_models_training_convention(tiny_gpt2, tiny_llama):
    """GPT-2's and SmolLM2's tokenizers start no sequence with BOS, so neither do our prompts
    by default; a tokenizer that prepends one (Gemma's) would make it the default."""
    assert models.trained_with_bos(tiny_gpt2) is False
    assert models.trained_with_bos(tiny_llama) is False


def test_a_tokenizer_that_prepends_bos_makes_it_the_default(tmp_path):
    """A model saved with a tokenizer that starts every sequence with BOS (as Gemma's does)."""
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(weights.gpt2_tokenizer_directory(), add_bos_token=True)
    if tokenizer("Mary")["input_ids"][0] != tokenizer.bos_token_id:
        pytest.skip("this tokenizer class ignores add_bos_token")
    tokenizer.save_pretrained(tmp_path)
    assert models.trained_with_bos(models.load_model(str(tmp_path))) is True


@pytest.mark.parametrize("build", [
    lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)),
    lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )),
    lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )),
], ids=["gpt2", "llama-tied", "qwen2"])
def test_weight_processing_without_copies_is_the_same(build, tmp_path):
    """The copy-free weight processing that lets a 1.5B model load in 14 GB gives bit for bit the
    weights TransformerLens's own gives, and leaves its steps as they were."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.weight_processing import ProcessWeights

    torch.manual_seed(0)
    build().save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(weights.gpt2_tokenizer_directory()).save_pretrained(tmp_path)
    steps = {name: ProcessWeights.__dict__[name] for name in models.COPYING_STEPS}

    def processed(lean):
        bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
        with models._processing_without_copies() if lean else contextlib.nullcontext():
            bridge.enable_compatibility_mode()
        return bridge.state_dict()

    lean, reference = processed(True), processed(False)
    assert lean.keys() == reference.keys()
    assert all(torch.equal(lean[k], reference[k]) for k in reference)
    assert {name: ProcessWeights.__dict__[name] for name in models.COPYING_STEPS} == steps


def test_a_study_holds_its_model_until_released(tiny_dir, monkeypatch):
    """A study loads its model once, on first use, and holds it; `release_model` lets it go, with
    what the engines kept for it (the next use loads it afresh); another study loads its own."""
    import weakref

    from ioi import study as study_module
    from ioi.engines import fast

    loads = []
    monkeypatch.setattr(study_module, "load_model", lambda name, device, **kwargs: loads.append(name) or models.load_model(name, device, **kwargs))
    monkeypatch.setenv("IOI_NO_CACHE", "1")  # so that building the study needs the model
    study = study_module.Study(study_module.StudyConfig(model=tiny_dir, n=4))
    first = study.model
    assert study.model is first and loads == [tiny_dir]
    gone = weakref.ref(first)
    fast_model = weakref.ref(fast.as_fast(first))  # kept with the model (ioi.engines.state)
    assert fast.as_fast(first) is fast_model()
    study.release_model()
    del first
    assert gone() is None and fast_model() is None  # nothing else held them
    assert study.model is not None and loads == [tiny_dir, tiny_dir]
    study_module.Study(study.config).model
    assert loads == [tiny_dir] * 3


def test_a_variant_borrows_its_studys_model(tiny_dir, monkeypatch):
    """A variant of a study (other prompts, other templates) computes with the model the study
    holds, loading it there if need be: one copy in memory, keyed on the same files."""
    from ioi import study as study_module

    loads = []
    monkeypatch.setattr(study_module, "load_model", lambda name, device, **kwargs: loads.append(name) or models.load_model(name, device, **kwargs))
    monkeypatch.setenv("IOI_NO_CACHE", "1")  # so that building the variant needs the model
    study = study_module.Study(study_module.StudyConfig(model=tiny_dir, n=4))
    variant = study.variant(n=6, templates="full")
    assert variant.model is study.model and loads == [tiny_dir]
    assert (len(variant.clean), variant.config.templates, variant.config.seed) == (6, "full", study.config.seed)
    assert variant.model_fingerprint == study.model_fingerprint
    with pytest.raises(ValueError, match="same model"):
        study.variant(model="gpt2-small")
