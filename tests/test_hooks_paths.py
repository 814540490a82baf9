"""Path patching: reduces to activation patching where the two must agree."""

import pytest
import torch
from conftest import make_pair

from ioi.engines import hooks_paths as pp
from ioi.metrics import logit_diff


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=10)


def test_last_layer_to_logits_equals_patching_at_end(tiny_model, data):
    """From a last-layer head to the logits, path patching is patching that head's ABC output
    into the clean run at END: nothing else lies on the path."""
    clean, corrupted = data
    last = tiny_model.cfg.n_layers - 1
    got = pp.path_patch(tiny_model, clean, corrupted, [(last, 1)], "logits")
    _, cache = tiny_model.run_with_cache(corrupted.tokens)
    abc_z = cache[f"blocks.{last}.attn.hook_z"]
    rows = torch.arange(len(clean))

    def hook(z, hook):
        z = z.clone()
        z[rows, clean.end, 1] = abc_z[rows, clean.end, 1]
        return z

    expected = logit_diff(tiny_model.run_with_hooks(clean.tokens, fwd_hooks=[(f"blocks.{last}.attn.hook_z", hook)]), clean)
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=0)


def test_no_senders_changes_nothing(tiny_model, data):
    """With no sender patched, freezing every head to its clean value is the clean run."""
    clean, corrupted = data
    got = pp.path_patch(tiny_model, clean, corrupted, [], [(2, 0)], "q")
    expected = logit_diff(tiny_model(clean.tokens), clean)
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=0)


def test_sender_after_receiver_has_no_effect(tiny_model, data):
    """A sender in a later layer than the receiver cannot reach its input."""
    clean, corrupted = data
    got = pp.path_patch(tiny_model, clean, corrupted, [(2, 0)], [(1, 0)], "v")
    expected = logit_diff(tiny_model(clean.tokens), clean)
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=0)


def test_sweep_covers_heads_before_receivers(tiny_model, data):
    """A sweep into layer-2 queries has one row for each head of layers 0 and 1."""
    clean, corrupted = data
    out = pp.path_patching(tiny_model, clean, corrupted, [(2, 0)], "q", "END")
    assert len(out) == 2 * tiny_model.cfg.n_heads and set(out.layer) == {0, 1}


def test_sweep_into_no_receivers_is_empty(tiny_model, data):
    """A class the circuit lacks gives an empty table, not an error."""
    clean, corrupted = data
    out = pp.path_patching(tiny_model, clean, corrupted, [], "q", "END")
    assert out.empty and {"layer", "head", "relative_change"} <= set(out.columns)


@pytest.mark.parametrize("position", ["S2", None])
def test_path_patching_in_batches_equals_one_batch(tiny_model, data, monkeypatch, position):
    """Each of its edited runs in bounded batches, a path patch gives what one whole batch gives."""
    from ioi import metrics

    clean, corrupted = data
    last = tiny_model.cfg.n_layers - 1
    args = (tiny_model, clean, corrupted, [(0, 1), (0, 2)], [(last, 1), (last, 2)], "v", position)
    names = [f"blocks.{last}.attn.hook_pattern"]
    whole_ld, whole = pp.path_patch_cache(*args, names=names)
    monkeypatch.setattr(metrics, "LOGITS_BYTES", 3 * clean.tokens.shape[1] * tiny_model.cfg.d_vocab * 4)
    assert len(metrics.batches(tiny_model, clean)) > 1
    ld, stored = pp.path_patch_cache(*args, names=names)
    torch.testing.assert_close(ld, whole_ld)
    torch.testing.assert_close(stored[names[0]], whole[names[0]])
