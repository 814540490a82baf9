"""Attribution patching: its gradients are the bridge's, and it is the first-order effect."""

import pytest
import torch

from conftest import make_pair
from ioi.engines import fast
from ioi.engines.attribution import attribute, compare_with_exact, top_k_overlap
from ioi.metrics import logit_diff


def _args(clean, corrupted):
    return clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token


def _bridge_gradient_product(model, clean, corrupted, hook_suffix, pattern):
    """(clean a - corrupted a) . dM/da for the bridge's `hook_suffix` activations, by layer."""
    wanted = lambda name: name.endswith(hook_suffix)  # noqa: E731
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(clean.tokens, names_filter=wanted)
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act
        return act

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted.tokens, fwd_hooks=[(wanted, keep)])
        logit_diff(logits, clean).mean().backward()
    names = sorted(kept, key=lambda n: int(n.split(".")[1]))
    return torch.stack([torch.einsum(pattern, clean_cache[n] - kept[n].detach(), kept[n].grad) for n in names])


def test_head_attribution_equals_the_bridges_gradient_product(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=6)
    ours = attribute(tiny_model, *_args(clean, corrupted))
    expected = _bridge_gradient_product(tiny_model, clean, corrupted, "attn.hook_z", "bphe,bphe->ph")
    torch.testing.assert_close(ours.head_pos, expected, atol=1e-5, rtol=1e-4)


def test_attribution_is_the_first_order_effect_of_a_small_patch(tiny_model):
    """Scale every clean-minus-corrupted difference down by eps: the exact effect of the patch
    becomes linear in it, and attribution patching is then exact up to O(eps^2)."""
    clean, corrupted = make_pair(tiny_model, n=6)
    w = fast.as_fast(tiny_model)
    task = fast.prepare(w, *_args(clean, corrupted))
    approx = attribute(w, *_args(clean, corrupted))
    eps, everyone = 1e-3, torch.arange(len(clean))
    for layer in (0, w.n_layers - 1):
        for head in range(w.n_heads):
            dz = eps * (task.clean.z[layer] - task.corrupted.z[layer])
            delta = fast.head_out_changes(w, w.layers[layer], task.corrupted.z[layer], dz, slice(head, head + 1))
            with torch.inference_mode():
                exact = fast._resid_mid_patched(task, layer, everyone, delta, 0).mean() - approx.corrupted_logit_diff
            estimate = eps * approx.head_pos[layer, :, head].sum()
            torch.testing.assert_close(exact.double(), estimate.double(), atol=1e-6 + 1e-2 * abs(float(estimate)), rtol=0)


def test_resid_attribution_vanishes_before_the_first_difference(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=6)
    approx = attribute(tiny_model, *_args(clean, corrupted))
    first = int((clean.tokens != corrupted.tokens).any(0).nonzero()[0])
    assert approx.resid_pre[:, :first].abs().max() < 1e-6
    assert approx.resid_pre.shape == (tiny_model.cfg.n_layers, clean.tokens.shape[1])
    assert approx.head.shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)


def test_compare_with_exact_reports_its_keys(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=6)
    result = compare_with_exact(tiny_model, clean, corrupted)
    assert set(result) == {"pearson_r", "top10_overlap", "exact_s", "attribution_s", "speedup"}
    assert -1 <= result["pearson_r"] <= 1 and 0 <= result["top10_overlap"] <= 1


def test_top_k_overlap():
    assert top_k_overlap([5, -4, 3, 0], [1, 2, 3, 4], k=2) == 0.0
    assert top_k_overlap([5, -4, 3, 0], [-9, 8, 0, 0], k=2) == 1.0


def test_input_and_layer_attributions_equal_the_bridges(tiny_model):
    """Queries, values, and whole attention and MLP outputs: the same gradient products as the
    bridge's hooks give (queries are compared after rotation, which first order does not see,
    and after Gemma 3's query norm, which it does: ours are the queries the scores read)."""
    clean, corrupted = make_pair(tiny_model, n=6)
    ours = attribute(tiny_model, *_args(clean, corrupted))
    normed = "blocks.0.attn.hook_q_normed" in tiny_model.hook_dict  # laid out [batch head pos d_head]
    q_hook, q_pattern = ("attn.hook_q_normed", "bhpe,bhpe->h") if normed else ("attn.hook_q", "bphe,bphe->h")
    for name, suffix, pattern in (("q", q_hook, q_pattern), ("v", "attn.hook_v", "bphe,bphe->h"),
                                  ("attn_out", "hook_attn_out", "bpd,bpd->"), ("mlp_out", "hook_mlp_out", "bpd,bpd->")):
        expected = _bridge_gradient_product(tiny_model, clean, corrupted, suffix, pattern)
        torch.testing.assert_close(getattr(ours, name), expected, atol=1e-5, rtol=1e-4)


def test_attention_output_attribution_is_the_sum_over_heads(tiny_model):
    """attn_out is linear in the heads' outputs, so its first-order effect is theirs summed
    (not so behind Gemma 3's post-attention norm)."""
    if fast.as_fast(tiny_model).layers[0].attn_post_norm_w is not None:
        pytest.skip("a norm after attention: the layer's output is not linear in its heads'")
    clean, corrupted = make_pair(tiny_model, n=6)
    ours = attribute(tiny_model, *_args(clean, corrupted))
    torch.testing.assert_close(ours.attn_out, ours.head.sum(1), atol=1e-6, rtol=1e-4)


def test_component_comparison_covers_every_kind(tiny_model):
    from ioi.engines.attribution import compare_components

    clean, corrupted = make_pair(tiny_model, n=6)
    result = compare_components(tiny_model, clean, corrupted)
    assert {"head_out", "resid_pre", "attn_out", "mlp_out", "q", "k", "v"} <= set(result)
    cfg = tiny_model.cfg
    assert result["q"]["n"] == cfg.n_layers * cfg.n_heads and result["mlp_out"]["n"] == cfg.n_layers
    assert all(-1 <= result[k]["pearson_r"] <= 1 for k in ("head_out", "q", "k", "v", "mlp_out"))


def test_attribution_by_chunks_of_prompts_is_the_whole_batchs(tiny_gpt2):
    """Prompts do not interact, so the estimates summed over chunks of prompts equal those of
    one backward pass over all of them."""
    clean, corrupted = make_pair(tiny_gpt2, n=10)
    args = (tiny_gpt2, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token)
    whole, chunked = attribute(*args, chunk=10), attribute(*args, chunk=3)
    for field in ("head_pos", "resid_pre", "attn_out", "mlp_out", "q", "k", "v"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), atol=1e-5, rtol=1e-4)
    assert chunked.corrupted_logit_diff == pytest.approx(whole.corrupted_logit_diff, abs=1e-5)
