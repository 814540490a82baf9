"""Direct logit attribution and the logit lens add up to what the model computes."""

import numpy as np
import pytest
import torch
from conftest import make_pair

from ioi.analyses import logit_attribution as dla
from ioi.engines import fast
from ioi.metrics import logit_diff


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "tiny_neox"])
def tiny_model(request):
    """The architectures whose heads write additively to the residual stream (Gemma 3's pass
    through a norm, whose scale the attribution freezes: see test_architectures)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def clean(tiny_model):
    return make_pair(tiny_model, n=8)[0]


def test_components_sum_to_the_logit_difference(tiny_model, clean):
    """Every prompt's component shares (embed, heads, biases, MLPs) sum to its logit diff."""
    per_prompt = dla.per_prompt_attributions(tiny_model, clean)
    total = per_prompt.groupby("prompt_index").dla.sum().to_numpy()
    expected = logit_diff(tiny_model(clean.tokens), clean).detach().double().numpy()
    np.testing.assert_allclose(total, expected, atol=1e-4)


def test_heads_sum_to_the_layer_attention_output(tiny_model, clean):
    """A layer's heads plus its bias give the share of the layer's whole attention output."""
    per_prompt = dla.per_prompt_attributions(tiny_model, clean)
    _, cache = tiny_model.run_with_cache(clean.tokens)
    rows = torch.arange(len(clean))
    scale = cache["ln_final.hook_scale"][rows, clean.end, 0]
    direction = dla.logit_diff_directions(fast.as_fast(tiny_model), clean)
    for layer in range(tiny_model.cfg.n_layers):
        attn = cache[f"blocks.{layer}.hook_attn_out"][rows, clean.end]
        if tiny_model.cfg.normalization_type in ("LN", "LNPre"):
            attn = attn - attn.mean(-1, keepdim=True)
        whole = (attn / scale[:, None] * direction).sum(-1)
        parts = per_prompt[(per_prompt.layer == layer) & per_prompt.component.isin(["head", "attn_bias"])]
        summed = parts.groupby("prompt_index").dla.sum().to_numpy()
        np.testing.assert_allclose(summed, whole.detach().double().numpy(), atol=1e-4)


def test_logit_lens_last_layer_is_the_logit_difference(tiny_model, clean):
    """Reading the last layer's residual stream through the final norm gives the model's answer."""
    lens = dla.logit_lens(tiny_model, clean)
    expected = logit_diff(tiny_model(clean.tokens), clean).mean().item()
    assert lens["mean"].iloc[-1] == pytest.approx(expected, abs=1e-4)
    assert len(lens) == tiny_model.cfg.n_layers
    assert (lens.ci_low <= lens["mean"]).all() and (lens["mean"] <= lens.ci_high).all()


def test_logit_lens_reads_gemma3_through_its_final_norm(tiny_gemma3):
    """Gemma 3's final norm keeps its weight (processing does not fold it): the lens's last
    reading is still the model's logit difference."""
    clean = make_pair(tiny_gemma3, n=6)[0]
    lens = dla.logit_lens(tiny_gemma3, clean)
    expected = logit_diff(tiny_gemma3(clean.tokens), clean).mean().item()
    assert lens["mean"].iloc[-1] == pytest.approx(expected, abs=1e-4)
