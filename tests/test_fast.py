"""ioi.engines.fast reproduces the bridge and TransformerLens's activation patching exactly."""

import numpy as np
import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_pair
from ioi.engines import fast
from ioi.bench import bench_patching
from ioi.metrics import logit_diff
from ioi.models import from_hf_model
from ioi.weights import gpt2_tokenizer_directory

TOL = 1e-4


def _args(clean, corrupted):
    return clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token


def _mean_logit_diff(clean):
    return lambda logits: logit_diff(logits, clean).mean()


def _clean_cache(model, clean):
    with torch.inference_mode():
        return model.run_with_cache(clean.tokens)[1]


@pytest.fixture(scope="module")
def tiny_gpt2_float64():
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = GPT2LMHeadModel(config)
    return from_hf_model(model, gpt2_tokenizer_directory(), dtype=torch.float64)


def test_fast_model_reproduces_the_bridge(tiny_model):
    clean, _ = make_pair(tiny_model)
    with torch.inference_mode():
        expected = logit_diff(tiny_model(clean.tokens), clean)
        ours = fast.end_logit_diff(fast.as_fast(tiny_model), *_args(clean, clean)[:1], clean.end, clean.io_token, clean.s_token)
        full = fast.logits(fast.as_fast(tiny_model), clean.tokens)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(logit_diff(full, clean), expected, atol=TOL, rtol=0)


def test_all_position_head_sweep_matches_transformer_lens(tiny_model):
    clean, corrupted = make_pair(tiny_model)
    expected = tlp.get_act_patch_attn_head_out_all_pos(
        tiny_model, corrupted.tokens, _clean_cache(tiny_model, clean), _mean_logit_diff(clean)
    )
    ours = fast.head_out_sweep(tiny_model, *_args(clean, corrupted), positions="all", batch_size=16)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_end_head_sweep_matches_transformer_lens(tiny_model):
    """Against TL's by-position sweep's END column, on prompts that share one END position."""
    clean, corrupted = make_pair(tiny_model, n=24)
    common_end = int(clean.end.mode().values)
    keep = (clean.end == common_end).numpy()
    clean, corrupted = clean.subset(keep), corrupted.subset(keep)
    expected = tlp.get_act_patch_attn_head_out_by_pos(
        tiny_model, corrupted.tokens, _clean_cache(tiny_model, clean), _mean_logit_diff(clean)
    )[:, common_end]
    ours = fast.head_out_sweep(tiny_model, *_args(clean, corrupted), positions="end")
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_end_head_sweep_matches_the_bench_baseline_with_mixed_ends(tiny_model):
    clean, corrupted = make_pair(tiny_model)
    assert len(clean.end.unique()) > 1
    result = bench_patching(tiny_model, n=8, positions="end")
    assert set(result) >= {"ours_s", "baseline_s", "speedup", "max_abs_diff", "model", "n", "positions"}
    assert result["max_abs_diff"] < TOL


def test_bench_patching_all_positions(tiny_model):
    result = bench_patching(tiny_model, n=6, positions="all")
    assert result["max_abs_diff"] < TOL and result["ours_s"] > 0 and result["baseline_s"] > 0


@pytest.mark.parametrize(
    "component, tl_sweep",
    [
        ("resid_pre", tlp.get_act_patch_resid_pre),
        ("attn_out", tlp.get_act_patch_attn_out),
        ("mlp_out", tlp.get_act_patch_mlp_out),
    ],
)
def test_position_sweeps_match_transformer_lens(tiny_model, component, tl_sweep):
    clean, corrupted = make_pair(tiny_model, n=8)
    expected = tl_sweep(tiny_model, corrupted.tokens, _clean_cache(tiny_model, clean), _mean_logit_diff(clean))
    ours = fast.resid_sweep(tiny_model, *_args(clean, corrupted), component=component)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_float64_sweeps_match_transformer_lens(tiny_gpt2_float64):
    model = tiny_gpt2_float64
    clean, corrupted = make_pair(model, n=6)
    cache, metric = _clean_cache(model, clean), _mean_logit_diff(clean)
    heads = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted.tokens, cache, metric)
    resid = tlp.get_act_patch_resid_pre(model, corrupted.tokens, cache, metric)
    # TransformerLens stores its results in float32, so they agree to float32 rounding
    torch.testing.assert_close(fast.head_out_sweep(model, *_args(clean, corrupted)).float(), heads, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.resid_sweep(model, *_args(clean, corrupted)).float(), resid, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["all", "end"])
def test_patching_clean_into_clean_changes_nothing(tiny_model, positions):
    clean, _ = make_pair(tiny_model, n=6)
    with torch.inference_mode():
        clean_ld = logit_diff(tiny_model(clean.tokens), clean)
    heads = fast.head_out_sweep(tiny_model, *_args(clean, clean), positions=positions, per_prompt=True)
    torch.testing.assert_close(heads, clean_ld.expand_as(heads), atol=TOL, rtol=0)
    resid = fast.resid_sweep(tiny_model, *_args(clean, clean), per_prompt=True)
    torch.testing.assert_close(resid, clean_ld.expand_as(resid), atol=TOL, rtol=0)


def test_end_and_all_positions_agree_when_only_end_differs(tiny_model):
    """If the prompts differ only at END, every head's clean z differs only from END onwards,
    so patching all positions and patching END alone are the same patch."""
    clean, _ = make_pair(tiny_model, n=6)
    corrupted_tokens = clean.tokens.clone()
    rows = torch.arange(len(clean))
    corrupted_tokens[rows, clean.end] = clean.tokens[rows.roll(1), clean.end.roll(1)] + 1
    args = (clean.tokens, corrupted_tokens, clean.end, clean.io_token, clean.s_token)
    every = fast.head_out_sweep(tiny_model, *args, positions="all")
    only_end = fast.head_out_sweep(tiny_model, *args, positions="end")
    torch.testing.assert_close(every, only_end, atol=TOL, rtol=0)


def test_per_prompt_sweeps_average_to_the_mean(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=6)
    per_prompt = fast.head_out_sweep(tiny_model, *_args(clean, corrupted), per_prompt=True)
    torch.testing.assert_close(per_prompt.mean(-1), fast.head_out_sweep(tiny_model, *_args(clean, corrupted)))


def test_tidy_frames(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=4)
    heads = fast.head_patching(tiny_model, clean, corrupted)
    cfg = tiny_model.cfg
    assert list(heads.columns) == ["layer", "head", "logit_diff"]
    assert len(heads) == cfg.n_layers * cfg.n_heads
    resid = fast.residual_patching(tiny_model, clean, corrupted, positions=range(clean.tokens.shape[1]))
    assert list(resid.columns) == ["layer", "position", "logit_diff"]
    assert len(resid) == cfg.n_layers * clean.tokens.shape[1]


def test_named_residual_patching_matches_the_hook_sweep(tiny_model):
    """Patching the residual stream at each prompt's own S2, END, ... agrees with the hook-based
    reference, across prompts of different lengths."""
    from ioi.engines.hooks import residual_patching

    clean, corrupted = make_pair(tiny_model, n=10, templates="full")
    assert len(set(clean.end.tolist())) > 1
    got = fast.residual_patching(tiny_model, clean, corrupted)
    expected = residual_patching(tiny_model, clean, corrupted)
    np.testing.assert_allclose(got.logit_diff, expected.logit_diff, atol=1e-4)


def test_layer_output_patching_matches_the_hook_sweep(tiny_model):
    """Whole attention and MLP layer outputs patched at every position, across prompts of
    different lengths, agree with the hook-based reference."""
    from ioi.engines.hooks import layer_patching

    clean, corrupted = make_pair(tiny_model, n=10, templates="full")
    got = fast.layer_patching(tiny_model, clean, corrupted)
    expected = layer_patching(tiny_model, clean, corrupted)
    for component in ("attn", "mlp"):
        corrupted_ld = _corrupted_ld(tiny_model, clean, corrupted)
        effect = got[got.component == component].logit_diff.to_numpy() - corrupted_ld
        expected_effect = expected[expected.component == component].logit_diff.to_numpy() - corrupted_ld
        assert np.abs(expected_effect).max() > 1e-4
        np.testing.assert_allclose(effect, expected_effect, rtol=0.01, atol=1e-6)


def test_head_input_patching_matches_the_hook_sweeps(tiny_model):
    """Queries, keys, values and patterns of chosen heads agree with the hook-based sweeps,
    including the key/value head mapping under grouped-query attention."""
    from ioi.engines import hooks as patching

    clean, corrupted = make_pair(tiny_model, n=10, templates="full")
    heads = [(0, 3), (1, 0), (2, 1), (2, 2)]
    got = fast.head_input_patching(tiny_model, clean, corrupted, heads)
    expected_all = patching.head_input_patching(tiny_model, clean, corrupted, heads)
    for activation in ("q", "k", "v", "pattern"):
        expected = expected_all[expected_all.activation == activation]
        ours = got[got.activation == activation]
        assert list(zip(ours.layer, ours["head"])) == list(zip(expected.layer, expected["head"]))
        # the effects on a random model are small: compare them, to a tolerance well below them
        corrupted_ld = _corrupted_ld(tiny_model, clean, corrupted)
        effect, expected_effect = ours.logit_diff - corrupted_ld, expected.logit_diff - corrupted_ld
        assert expected_effect.abs().max() > 5e-6
        np.testing.assert_allclose(effect, expected_effect, rtol=0.05, atol=1e-6)


def _corrupted_ld(model, clean, corrupted):
    with torch.inference_mode():
        return fast.end_logit_diff(fast.as_fast(model), corrupted.tokens, clean.end, clean.io_token, clean.s_token).mean().item()


def test_bench_scaling_rows(monkeypatch):
    """One row per N (GPT-2 small's shape) and per size, each shape as configured."""
    from ioi import bench

    monkeypatch.setattr(bench, "GPT2_SHAPES", {"gpt2-small": (2, 2, 32), "gpt2-medium": (3, 4, 64)})
    rows = bench.bench_scaling(ns=[4], sizes=["gpt2-medium"], n=3, positions="end")
    assert [(r["shape"], r["n"]) for r in rows] == [("gpt2-small", 4), ("gpt2-medium", 3)]
    assert (rows[1]["n_layers"], rows[1]["n_heads"], rows[1]["d_model"]) == (3, 4, 64)
    assert all(r["baseline_est_s"] == pytest.approx(r["bridge_forward_s"] * r["n_layers"] * r["n_heads"]) for r in rows)


def test_cached_runs_are_reused_only_for_the_same_model_and_tokens(tiny_model):
    """A study's sweeps share one clean and one corrupted run; a stale run must never be served."""
    clean, corrupted = make_pair(tiny_model, n=4)
    w = fast.as_fast(tiny_model)
    tokens = clean.tokens.clone()
    first = fast.cached_runs(w, tokens, corrupted.tokens)
    assert fast.cached_runs(w, tokens.clone(), corrupted.tokens.clone()) is first  # equal values
    tokens[0, -1] = (tokens[0, -1] + 1) % w.W_E.shape[0]  # changed in place: the kept copy tells them apart
    changed = fast.cached_runs(w, tokens, corrupted.tokens)
    assert changed is not first
    torch.testing.assert_close(changed[0].resid_final, fast.run_with_cache(w, tokens).resid_final)
    other = fast.from_bridge(tiny_model)  # equal weights, another model object
    assert fast.cached_runs(other, tokens, corrupted.tokens) is not changed
    # a sweep run twice (the second time on the kept runs) gives the same numbers
    args = _args(clean, corrupted)
    torch.testing.assert_close(fast.head_out_sweep(w, *args), fast.head_out_sweep(w, *args), atol=0, rtol=0)


@pytest.mark.parametrize("experiment, kwargs", [
    ("residual_patching", {}), ("layer_patching", {}), ("head_patching", {"positions": "all"}),
    ("head_patching", {"positions": "end"}), ("head_input_patching", {"heads": [(0, 3), (2, 1)]}),
])
def test_both_engines_return_one_frame(tiny_model, experiment, kwargs):
    """Each experiment has one name, signature and frame in both engines (the selector only
    chooses): the same columns, dtypes and rows, and the same numbers."""
    from ioi.engines import hooks

    clean, corrupted = make_pair(tiny_model, n=6, templates="full")
    ours = getattr(fast, experiment)(tiny_model, clean, corrupted, **kwargs)
    reference = getattr(hooks, experiment)(tiny_model, clean, corrupted, **kwargs)
    pd.testing.assert_frame_equal(ours, reference, check_exact=False, atol=1e-4, rtol=0)
