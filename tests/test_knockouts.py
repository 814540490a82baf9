"""Knock-outs and the S-inhibition experiments on every tiny architecture: invariants that need
no expected numbers (clean into clean changes nothing; attributions add up; the position/token
fit is the least-squares fit), and agreement with a direct computation."""

import numpy as np
import torch
from conftest import make_pair

from ioi.analyses import adversarial
from ioi.circuits import criteria, knockouts, s_inhibition
from ioi.engines.hooks import run_with_cache
from ioi.metrics import logit_diff


def _own_values(model, dataset, names):
    """`group_means`' format with each prompt its own group: its own activations."""
    _, cache = run_with_cache(model, dataset, names)
    return {"means": {n: cache[n] for n in names}, "groups": torch.arange(len(dataset))}


def test_knocking_out_with_the_clean_values_changes_nothing(tiny_model):
    """Heads and MLPs replaced by their own clean values: the logit difference is unchanged."""
    clean, _ = make_pair(tiny_model, n=6)
    layers = range(tiny_model.cfg.n_layers)
    z_names = [f"blocks.{l}.attn.hook_z" for l in layers]
    mlp_names = [f"blocks.{l}.hook_mlp_out" for l in layers]
    hooks = (knockouts.head_knockout_hooks([(0, 1), (2, 3)], _own_values(tiny_model, clean, z_names))
             + knockouts.mlp_knockout_hooks(list(layers)[1:], _own_values(tiny_model, clean, mlp_names)))
    with torch.inference_mode():
        plain = logit_diff(tiny_model(clean.tokens), clean)
        knocked = logit_diff(tiny_model.run_with_hooks(clean.tokens, fwd_hooks=hooks), clean)
    torch.testing.assert_close(knocked, plain, atol=1e-4, rtol=1e-4)


def test_head_knockout_is_the_circuit_criteria_ablation(tiny_model):
    """Knocking out heads at every position is `run_circuit` with every other head kept."""
    clean, corrupted = make_pair(tiny_model, n=8)
    means = criteria.group_means(tiny_model, corrupted)
    gone = [(1, 0), (2, 2)]
    whole = criteria.whole_model(tiny_model)
    expected = criteria.run_circuit(tiny_model, whole.without(gone), clean, means)
    with torch.inference_mode():
        got = logit_diff(tiny_model.run_with_hooks(clean.tokens, fwd_hooks=knockouts.head_knockout_hooks(gone, means)), clean)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_backup_changes_add_up_to_each_runs_logit_difference(tiny_model):
    """Per prompt, the attributions of each run add up to that run's own logit difference (the
    knocked-out one computed here independently), so lost and recovered account for the change;
    the knocked-out heads are marked and nothing else."""
    clean, corrupted = make_pair(tiny_model, n=8)
    movers = [(2, 1), (2, 3)]
    changes = knockouts.backup_changes(tiny_model, clean, corrupted, movers)
    per_prompt = knockouts.backup_per_prompt(changes)
    hooks = knockouts.head_knockout_hooks(movers, criteria.group_means(tiny_model, corrupted))
    with torch.inference_mode():
        before = logit_diff(tiny_model(clean.tokens), clean).double().numpy()
        after = logit_diff(tiny_model.run_with_hooks(clean.tokens, fwd_hooks=hooks), clean).double().numpy()
    np.testing.assert_allclose(per_prompt.logit_diff_before, before, atol=1e-4)
    np.testing.assert_allclose(per_prompt.logit_diff_after, after, atol=1e-4)
    np.testing.assert_allclose(after - before, per_prompt.recovered_by_heads + per_prompt.recovered_by_rest - per_prompt.lost,
                               atol=1e-4)
    marked = changes[changes.knocked_out][["layer", "head"]].drop_duplicates()
    assert sorted(map(tuple, marked.to_numpy())) == movers
    rises = knockouts.head_rises(changes)
    assert len(rises) == tiny_model.cfg.n_layers * tiny_model.cfg.n_heads - len(movers)
    assert (rises.rise_ci_low <= rises.rise + 1e-9).all() and (rises.rise <= rises.rise_ci_high + 1e-9).all()


def test_mlp_knockout_rows(tiny_model):
    clean, corrupted = make_pair(tiny_model, n=6)
    frame = knockouts.mlp_knockout(tiny_model, clean, corrupted)
    with torch.inference_mode():
        plain = logit_diff(tiny_model(clean.tokens), clean).double().numpy()
    np.testing.assert_allclose(frame.logit_diff, plain, atol=1e-5)
    assert len(frame) == len(clean) and np.isfinite(frame.knocked_out).all()


def test_s_inhibition_experiments_without_senders_change_nothing(tiny_model):
    """Patching no sender (or senders from the clean prompts themselves) leaves the name movers'
    attention and the logit difference as they are, so position and token coefficients are 0."""
    clean, corrupted = make_pair(tiny_model, n=6)
    movers, senders = [(2, 0), (2, 3)], [(1, 1)]
    same = s_inhibition.name_mover_attention(tiny_model, clean, clean, senders, movers)
    np.testing.assert_allclose(same.to_io_patched, same.to_io_clean, atol=1e-5)
    np.testing.assert_allclose(same.to_s2_patched, same.to_s2_clean, atol=1e-5)
    moved = s_inhibition.name_mover_attention(tiny_model, clean, corrupted, senders, movers)
    np.testing.assert_allclose(moved.to_io_clean, same.to_io_clean, atol=1e-6)
    none = s_inhibition.position_token(tiny_model, clean, tiny_model.tokenizer, [], movers)
    np.testing.assert_allclose(none[["a", "b"]].to_numpy(), 0.0, atol=1e-4)


def test_position_token_fit_is_least_squares(tiny_model):
    """a and b are the least-squares coefficients of the four cells on (position, token) in
    {+1, -1}^2, prompt by prompt; the unflipped cell is the clean logit difference."""
    clean, _ = make_pair(tiny_model, n=6)
    frame = s_inhibition.position_token(tiny_model, clean, tiny_model.tokenizer, [(1, 0), (1, 2)], [(2, 1)])
    with torch.inference_mode():
        np.testing.assert_allclose(frame.ld_pos_tok, logit_diff(tiny_model(clean.tokens), clean).double().numpy(), atol=1e-5)
    design = np.array([[1, 1], [-1, 1], [1, -1], [-1, -1]], dtype=float)
    cells = frame[["ld_pos_tok", "ld_flip_pos", "ld_flip_tok", "ld_flip_both"]].to_numpy()
    fitted = np.linalg.lstsq(design, cells.T, rcond=None)[0].T
    np.testing.assert_allclose(frame[["a", "b"]].to_numpy(), fitted, atol=1e-9)


def test_extra_io_keeps_the_qualifying_prompts_and_their_answers(tiny_model):
    clean, _ = make_pair(tiny_model, n=12)
    frame = adversarial.extra_io(tiny_model, clean, "[A] was tired. [A] wanted to go home.")
    assert 0 < len(frame) <= len(clean)
    assert set(frame.prompt_index) <= set(range(len(clean)))
    for i, prompt in zip(frame.prompt_index, frame.prompt_extra_io):
        io = clean.records[i].io
        assert prompt.count(io) == clean.prompts[i].count(io) + 2
    with torch.inference_mode():
        kept = logit_diff(tiny_model(clean.tokens), clean).double().numpy()[frame.prompt_index]
    np.testing.assert_allclose(frame.logit_diff, kept, atol=1e-4)
