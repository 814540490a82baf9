"""Shared fixtures: tiny random models of the architectures the project supports, with the
real tokenizers, so that every invariant runs in seconds on a CPU without downloading weights."""

import pytest
import torch
from transformers import (
    AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
    GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
)

from ioi.dataset import corrupt, make_dataset
from ioi.models import from_hf_model
from ioi.weights import _smollm2_directory, gpt2_tokenizer_directory


def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@pytest.fixture(scope="session")
def tiny_gpt2():
    """GPT-2 architecture, 3 layers x 4 heads, d_model 64, GPT-2's real tokenizer."""
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64)
    model = _seeded(lambda: GPT2LMHeadModel(config))
    bridge = from_hf_model(model, gpt2_tokenizer_directory())
    bridge.ioi_name = "tiny-gpt2"
    return bridge


@pytest.fixture(scope="session")
def tiny_llama():
    """Llama architecture with grouped-query attention (4 query heads, 2 key/value heads),
    rotary embeddings and RMSNorm, 3 layers, d_model 64, SmolLM2's real tokenizer."""
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = _seeded(lambda: LlamaForCausalLM(config))
    bridge = from_hf_model(model, _smollm2_directory())
    bridge.ioi_name = "tiny-llama"
    return bridge


@pytest.fixture(scope="session")
def tiny_neox():
    """GPT-NeoX (Pythia) architecture: parallel attention and MLP, rotary embeddings on 25% of
    each head's dimensions, 3 layers x 4 heads, d_model 64, GPT-2's tokenizer (Pythia's differs,
    not its shapes)."""
    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25,
    )
    model = _seeded(lambda: GPTNeoXForCausalLM(config))
    bridge = from_hf_model(model, gpt2_tokenizer_directory())
    bridge.ioi_name = "tiny-neox"
    return bridge


@pytest.fixture(scope="session")
def tiny_gemma3():
    """Gemma 3 (text) architecture: embeddings scaled by sqrt(d_model), (1 + w) RMSNorms before
    and after attention and MLP, query/key norms, a GeGLU MLP, one key/value head, sliding-window
    layers (a window of 4 tokens, so that it bites on IOI prompts) beside a global layer with its
    own rotary base, and attention scaled by query_pre_attn_scalar (256) rather than d_head (16).
    3 layers x 4 heads, d_model 64, GPT-2's tokenizer. Its norm weights are random, as a trained
    model's are not zero."""
    config = Gemma3TextConfig(
        vocab_size=50304, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )

    def build():
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(0, 0.5)
        return model

    bridge = from_hf_model(_seeded(build), gpt2_tokenizer_directory())
    bridge.ioi_name = "tiny-gemma3"
    return bridge


@pytest.fixture(scope="session", params=["tiny_gpt2", "tiny_llama", "tiny_neox", "tiny_gemma3"])
def tiny_model(request):
    """Each tiny model in turn: tests that take it run on every architecture."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A 3-layer, 4-head random GPT-2 with GPT-2's tokenizer, saved where `load_model` can
    read it by path."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_directory()).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_directory())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(_smollm2_directory())


def make_pair(model, n=12, seed=0, templates="mixed", prepend_bos=False):
    """A clean IOI dataset and its ABC corruption for `model`'s tokenizer."""
    clean = make_dataset(model.tokenizer, n, seed=seed, templates=templates, prepend_bos=prepend_bos)
    return clean, corrupt(clean, model.tokenizer)
