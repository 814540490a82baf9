"""The fast mean-ablation engine against the hook-based reference `ioi.circuits.criteria.run_circuit`."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_pair
from jaxtyping import TypeCheckError

from ioi.circuits import criteria as C
from ioi.engines import fast
from ioi.engines import fast_ablation
from ioi.metrics import logit_diff


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=16, templates="full")


def _circuits(model):
    """Circuits mixing every kind of kept position, and one that keeps nothing."""
    return [
        C.Circuit({"a": ((0, 1), (2, 0)), "b": ((1, 2),), "c": ((2, 3),)}, {"a": "END", "b": "S2", "c": "ALL"}),
        C.Circuit({"a": ((1, 0), (1, 3)), "b": ((0, 2), (2, 1))}, {"a": "ALL", "b": "S1+1"}),
        C.Circuit({}, {}),
        C.whole_model(model),
    ]


def _reference(model, circuit, clean, corrupted):
    return C.run_circuit(model, circuit, clean, C.group_means(model, corrupted))


def test_circuits_match_the_hooked_reference(tiny_model, data):
    """Every circuit's per-prompt logit difference equals the hook-based run's."""
    clean, corrupted = data
    ablation = C.mean_ablation(tiny_model, clean, corrupted)
    circuits = _circuits(tiny_model)
    got = C.circuit_logit_diffs(tiny_model, circuits, clean, ablation)
    for circuit, values in zip(circuits, got):
        torch.testing.assert_close(values, _reference(tiny_model, circuit, clean, corrupted), atol=1e-4, rtol=0)


def test_whole_model_is_the_clean_run(tiny_model, data):
    clean, corrupted = data
    ablation = C.mean_ablation(tiny_model, clean, corrupted)
    got = C.circuit_logit_diffs(tiny_model, [C.whole_model(tiny_model)], clean, ablation)[0]
    with torch.inference_mode():
        expected = logit_diff(tiny_model(clean.tokens), clean)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 512])
def test_knockouts_from_a_base_match_the_reference(tiny_model, data, batch_size):
    """Knockouts run from the base's cached run (removing heads, and restoring one on top of a
    smaller base, as minimality does) equal each one run from scratch with hooks, whatever the
    stacking of variants."""
    clean, corrupted = data
    ablation = C.mean_ablation(tiny_model, clean, corrupted)
    circuit = _circuits(tiny_model)[0]
    base = circuit.without([(0, 1), (2, 0)])
    variants = [base, circuit.without([(0, 1)]), circuit.without([(2, 0)]), circuit, base.without([(2, 3)])]
    keeps = [C.keep_mask(tiny_model, c, clean) for c in variants]
    got = fast_ablation.logit_diffs(ablation, keeps, C.keep_mask(tiny_model, base, clean), batch_size)
    for variant, values in zip(variants, got):
        torch.testing.assert_close(values, _reference(tiny_model, variant, clean, corrupted), atol=1e-4, rtol=0)


def test_variants_start_where_they_differ(tiny_model, data):
    clean, _ = data
    circuit = _circuits(tiny_model)[0]
    base = C.keep_mask(tiny_model, circuit, clean)
    assert fast_ablation.start_layer(base, base) == tiny_model.cfg.n_layers
    assert fast_ablation.start_layer(base, C.keep_mask(tiny_model, circuit.without([(2, 0)]), clean)) == 2
    assert fast_ablation.start_layer(base, C.keep_mask(tiny_model, circuit.without([(1, 2)]), clean)) == 1


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_nothing_changes_before_the_first_change(tiny_model, prepend_bos):
    """Prompts are split by length; before each group's first change every prompt's group mean
    is its own clean head output, so ablation there changes nothing; at it some mean differs."""
    clean, corrupted = make_pair(tiny_model, n=16, templates="full", prepend_bos=prepend_bos)
    ablation = C.mean_ablation(tiny_model, clean, corrupted)
    names = [f"blocks.{l}.attn.hook_z" for l in range(tiny_model.cfg.n_layers)]
    _, cache = C.run_with_cache(tiny_model, clean, names)
    grouped = torch.cat([prompts for prompts, _ in ablation.length_groups])
    assert sorted(grouped.tolist()) == list(range(len(clean)))
    for prompts, first in ablation.length_groups:
        assert len(set(clean.end[prompts].tolist())) == 1 and 0 < first <= int(clean.end[prompts[0]])
        for name, mean in zip(names, ablation.mean_z):
            torch.testing.assert_close(mean[prompts, :first], cache[name][prompts, :first], atol=1e-5, rtol=0)
        assert any((mean[prompts, first] - cache[name][prompts, first]).abs().max() > 1e-4
                   for name, mean in zip(names, ablation.mean_z))


def test_no_variants_is_an_error(tiny_gpt2):
    clean, corrupted = make_pair(tiny_gpt2, n=4)
    with pytest.raises(ValueError, match="no variants"):
        fast_ablation.logit_diffs(C.mean_ablation(tiny_gpt2, clean, corrupted), [])


def test_misaligned_reference_is_an_error(tiny_gpt2):
    """Our clear error, or jaxtyping's shape check when the tests run with it."""
    clean, corrupted = make_pair(tiny_gpt2, n=4)
    with pytest.raises((ValueError, TypeCheckError)):
        fast_ablation.prepare(tiny_gpt2, clean.tokens, clean.end, clean.io_token, clean.s_token,
                              corrupted.tokens[:2], torch.zeros(4, dtype=torch.long))


def _naive_f(model, circuit, clean, corrupted):
    return _reference(model, circuit, clean, corrupted).mean().item()


def test_completeness_and_minimality_match_naive_definitions(tiny_gpt2):
    """The criteria's bookkeeping (which knockouts, from which base, the greedy choice) gives the
    numbers of their definitions computed naively, one hooked run per knockout."""
    clean, corrupted = make_pair(tiny_gpt2, n=8)
    circuit = C.Circuit({"a": ((0, 1), (1, 0), (2, 2)), "b": ((2, 3), (1, 1))}, {"a": "END", "b": "ALL"})
    whole = C.whole_model(tiny_gpt2)
    f = lambda c: _naive_f(tiny_gpt2, c, clean, corrupted)  # noqa: E731

    table = C.completeness(tiny_gpt2, circuit, clean, corrupted, n_random=2, greedy_size=2)
    for _, row in table.iterrows():
        k = [tuple(int(x) for x in h.split(".")) for h in row.K.split()]
        assert row.F_C_minus_K == pytest.approx(f(circuit.without(k)), abs=1e-4)
        assert row.F_M_minus_K == pytest.approx(f(whole.without(k)), abs=1e-4)
    chosen = []
    for _ in range(2):  # the greedy search, naively
        scores = {h: abs(f(circuit.without(chosen + [h])) - f(whole.without(chosen + [h])))
                  for h in circuit.heads if h not in chosen}
        chosen.append(max(scores, key=scores.get))
    assert table.iloc[-1].K == " ".join(f"{l}.{h}" for l, h in chosen)

    mini = C.minimality(tiny_gpt2, circuit, clean, corrupted).set_index(["layer", "head"])
    f_c = f(circuit)
    for cls, members in circuit.classes.items():
        for v in members:
            rest = [h for h in members if h != v]
            changes = {"empty": abs(f(circuit.without([v])) - f_c),
                       "rest of class": abs(f(circuit.without(members)) - f(circuit.without(rest)))}
            row = mini.loc[v]
            assert row.change == pytest.approx(max(changes.values()), abs=1e-4)
            assert row.relative_change == pytest.approx(row.change / abs(f_c))
    assert isinstance(mini, pd.DataFrame) and np.isfinite(mini.change).all()


def test_knockout_estimates_are_first_order_effects(tiny_model, data):
    """Move each kept head's output only eps of the way to its mean: the exact change of F is
    then eps times the estimate, up to O(eps^2). (Means equal to the base run's own outputs,
    plus eps of the difference, leave the base run as it is.)"""
    clean, corrupted = data
    ablation = C.mean_ablation(tiny_model, clean, corrupted)
    circuit = _circuits(tiny_model)[0]
    keep = C.keep_mask(tiny_model, circuit, clean)
    f_base, estimates = fast_ablation.knockout_estimates(ablation, keep)
    with torch.inference_mode():
        own = fast_ablation.base_run(ablation, keep).z
    eps = 1e-3
    nudged = tuple(z + eps * (mean - z) for z, mean in zip(own, ablation.mean_z))
    near = fast_ablation.MeanAblation(**{**ablation.__dict__, "mean_z": nudged})
    heads = circuit.heads
    exact = C.circuit_logit_diffs(tiny_model, [circuit.without([h]) for h in heads], clean, near, base=circuit).mean(-1)
    assert f_base == pytest.approx(C.circuit_logit_diffs(tiny_model, [circuit], clean, ablation)[0].mean().item(), abs=1e-5)
    for h, value in zip(heads, exact):
        expected = eps * float(estimates[h])
        assert float(value) - f_base == pytest.approx(expected, abs=1e-7 + 0.02 * abs(expected))
    assert estimates.abs().max() > 0 and (estimates[~keep.any(1).any(1)] == 0).all()
    f_chunked, chunked = fast_ablation.knockout_estimates(ablation, keep, chunk=5)  # prompts 5 at a time
    assert f_chunked == pytest.approx(f_base, abs=1e-5)
    torch.testing.assert_close(chunked, estimates, atol=1e-6, rtol=1e-4)


def test_screened_greedy_with_every_head_is_the_greedy(tiny_gpt2):
    """A screen that keeps every candidate changes nothing; a narrow one still returns a valid,
    exactly evaluated K."""
    clean, corrupted = make_pair(tiny_gpt2, n=8)
    circuit = C.Circuit({"a": ((0, 1), (1, 0), (2, 2)), "b": ((2, 3), (1, 1))}, {"a": "END", "b": "ALL"})
    full = C.completeness(tiny_gpt2, circuit, clean, corrupted, n_random=0, greedy_size=2)
    screened = C.completeness(tiny_gpt2, circuit, clean, corrupted, n_random=0, greedy_size=2, greedy_candidates=5)
    pd.testing.assert_frame_equal(full, screened)
    narrow = C.completeness(tiny_gpt2, circuit, clean, corrupted, n_random=0, greedy_size=2, greedy_candidates=1)
    greedy = narrow.iloc[-1]
    k = [tuple(int(x) for x in h.split(".")) for h in greedy.K.split()]
    assert len(k) == 2 and set(k) <= set(circuit.heads)
    assert greedy.F_C_minus_K == pytest.approx(_naive_f(tiny_gpt2, circuit.without(k), clean, corrupted), abs=1e-4)


def test_group_means_are_shared_only_for_the_same_groups(tiny_gpt2):
    """Faithfulness, completeness and minimality reuse one set of means; other groups get theirs."""
    clean, corrupted = make_pair(tiny_gpt2, n=4)
    args = (tiny_gpt2, clean.tokens, clean.end, clean.io_token, clean.s_token, corrupted.tokens)
    runs = fast.cached_runs(fast.as_fast(tiny_gpt2), clean.tokens, corrupted.tokens)
    one_group = fast_ablation.prepare(*args, torch.zeros(4, dtype=torch.long))
    assert fast_ablation.prepare(*args, torch.zeros(4, dtype=torch.long)).mean_z is one_group.mean_z
    # one result is kept at a time: the means took the runs' place, and the runs take theirs
    assert fast.cached_runs(fast.as_fast(tiny_gpt2), clean.tokens, corrupted.tokens) is not runs
    assert fast_ablation.prepare(*args, torch.zeros(4, dtype=torch.long)).mean_z is not one_group.mean_z
    own = fast_ablation.prepare(*args, torch.arange(4))  # each prompt its own group: its own z
    assert own.mean_z is not one_group.mean_z
    z = fast.run_with_cache(fast.as_fast(tiny_gpt2), corrupted.tokens).z
    torch.testing.assert_close(own.mean_z[-1], z[-1])
    torch.testing.assert_close(one_group.mean_z[-1], z[-1].mean(0, keepdim=True).expand_as(z[-1]))
