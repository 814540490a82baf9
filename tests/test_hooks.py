"""Activation patching: invariants, and agreement with `transformer_lens.patching`."""

import pytest
import torch
import transformer_lens.patching as tl_patching
from conftest import make_pair

from ioi.engines import hooks as patching
from ioi.metrics import logit_diff


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=10, templates="baba")


def _tl_metric(dataset):
    return lambda logits: logit_diff(logits, dataset).mean()


def test_clean_into_clean_changes_nothing(tiny_model, data):
    """Patching the clean run's activations into the clean run leaves the logit difference."""
    clean, _ = data
    out = patching.head_patching(tiny_model, clean, clean)
    base = logit_diff(tiny_model(clean.tokens), clean).mean().item()
    assert out.logit_diff.to_numpy() == pytest.approx(base, abs=1e-5)


def test_all_heads_of_a_layer_equal_the_attention_output(tiny_model, data):
    """Patching every head's z at a layer is the same as patching the layer's attention output."""
    clean, corrupted = data
    _, cache = patching.run_with_cache(tiny_model, clean)
    layer = 1
    z = cache[f"blocks.{layer}.attn.hook_z"]
    all_heads = patching.patch_once(
        tiny_model, corrupted, f"blocks.{layer}.attn.hook_z", z, patching.set_all, ()
    )
    attn = patching.patch_once(
        tiny_model, corrupted, f"blocks.{layer}.hook_attn_out",
        cache[f"blocks.{layer}.hook_attn_out"], patching.set_all, (),
    )
    torch.testing.assert_close(all_heads, attn, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "activation, theirs",
    [
        ("z", tl_patching.get_act_patch_attn_head_out_all_pos),
        ("q", tl_patching.get_act_patch_attn_head_q_all_pos),
        ("v", tl_patching.get_act_patch_attn_head_v_all_pos),
        ("pattern", tl_patching.get_act_patch_attn_head_pattern_all_pos),
    ],
)
def test_head_sweeps_agree_with_transformer_lens(tiny_model, data, activation, theirs):
    """Our head sweeps give TransformerLens's numbers on the same model and data."""
    clean, corrupted = data
    _, cache = tiny_model.run_with_cache(clean.tokens)
    expected = theirs(tiny_model, corrupted.tokens, cache, _tl_metric(corrupted))
    if activation == "z":
        got = patching.head_patching(tiny_model, clean, corrupted)
    else:
        got = patching.head_input_patching(tiny_model, clean, corrupted, activations=[activation])
    got = got.pivot(index="layer", columns="head", values="logit_diff")
    torch.testing.assert_close(torch.tensor(got.to_numpy()), expected.double(), atol=1e-4, rtol=0)


def test_residual_sweep_agrees_with_transformer_lens(tiny_model, data):
    """Residual patching at absolute positions matches TransformerLens's layer x position sweep."""
    clean, corrupted = data
    _, cache = tiny_model.run_with_cache(clean.tokens)
    expected = tl_patching.get_act_patch_resid_pre(
        tiny_model, corrupted.tokens, cache, _tl_metric(corrupted)
    )
    positions = range(clean.tokens.shape[1])
    got = patching.residual_patching(tiny_model, clean, corrupted, positions=positions)
    got = got.pivot(index="layer", columns="position", values="logit_diff")
    torch.testing.assert_close(torch.tensor(got.to_numpy()), expected.double(), atol=1e-4, rtol=0)


def test_whole_residual_stream_restores_clean(tiny_model, data):
    """Patching the entire residual stream before layer 0 turns the corrupted run into the
    clean run: the normalised metric is exactly 1."""
    clean, corrupted = data
    runs = patching.clean_and_corrupted(tiny_model, clean, corrupted, ["blocks.0.hook_resid_pre"])
    resid = runs["clean_cache"]["blocks.0.hook_resid_pre"]
    ld = patching.patch_once(tiny_model, corrupted, "blocks.0.hook_resid_pre", resid, patching.set_all, ())
    assert ld.mean().item() == pytest.approx(runs["clean_ld"], abs=1e-5)


def test_batched_runs_equal_one_run(tiny_model, data, monkeypatch):
    """Run in batches of bounded memory, the END logits and the cache equal one whole run's."""
    from ioi import metrics

    clean, _ = data
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern"]
    whole_logits, whole = tiny_model.run_with_cache(clean.tokens, names_filter=set(names).__contains__)
    monkeypatch.setattr(metrics, "LOGITS_BYTES", 3 * clean.tokens.shape[1] * tiny_model.cfg.d_vocab * 4)
    assert len(metrics.batches(tiny_model, clean)) > 1
    logits, cache = patching.run_with_cache(tiny_model, clean, names)
    torch.testing.assert_close(logits, whole_logits[torch.arange(len(clean)), clean.end])
    for name in names:
        torch.testing.assert_close(cache[name], whole[name])
    torch.testing.assert_close(metrics.run_end_logits(tiny_model, clean), logits)


def test_edited_runs_in_batches_equal_one_edited_run(tiny_model, data, monkeypatch):
    """An edit built per batch (`hooks.Edit`: here a mean-ablation of two heads) gives, run in
    batches, the END logits and cache of the same hooks run once on every prompt."""
    from functools import partial

    from ioi import metrics
    from ioi.circuits import criteria, knockouts

    clean, corrupted = data
    heads, means = [(0, 1), (1, 2)], criteria.group_means(tiny_model, corrupted)
    names = ["blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    whole = {}
    with torch.inference_mode():
        whole_logits = tiny_model.run_with_hooks(clean.tokens, fwd_hooks=knockouts.head_knockout_hooks(heads, means)
                                                 + [(name, patching.storer(whole, name)) for name in names])
    monkeypatch.setattr(metrics, "LOGITS_BYTES", 3 * clean.tokens.shape[1] * tiny_model.cfg.d_vocab * 4)
    assert len(metrics.batches(tiny_model, clean)) > 1
    logits, cache = patching.run_with_cache(tiny_model, clean, names, partial(knockouts.head_knockout_hooks, heads, means))
    torch.testing.assert_close(logits, whole_logits[torch.arange(len(clean)), clean.end])
    for name in names:
        torch.testing.assert_close(cache[name], whole[name])
    plain, _ = patching.run_with_cache(tiny_model, clean, [])
    assert not torch.allclose(logits, plain), "the knock-out changed nothing: the test would pass without the edit"
