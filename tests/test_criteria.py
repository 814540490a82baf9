"""Circuit evaluation: mean ablation, faithfulness, completeness, minimality."""

import numpy as np
import pytest
import torch
from conftest import make_pair

from ioi.circuits import criteria as C
from ioi.metrics import logit_diff


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=16, templates="full")


def test_whole_model_circuit_is_faithful(tiny_model, data):
    """A circuit that is the whole model ablates nothing: faithfulness exactly 1."""
    clean, corrupted = data
    result = C.faithfulness(tiny_model, C.whole_model(tiny_model), clean, corrupted)
    assert result["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert result["F_C"] == pytest.approx(result["F_M"], abs=1e-5)


def test_ablating_with_the_clean_mean_of_one_prompt_changes_nothing(tiny_model, data):
    """Mean-ablating everything with means taken over the clean prompts themselves, one prompt
    per group, reproduces the clean run: the ablation puts back what was there."""
    clean, _ = data
    single = clean.subset(np.arange(len(clean)) == 0)
    means = C.group_means(tiny_model, single)
    empty = C.Circuit({}, {})
    got = C.run_circuit(tiny_model, empty, single, means)
    expected = logit_diff(tiny_model(single.tokens), single)
    torch.testing.assert_close(got, expected.detach(), atol=1e-4, rtol=0)


def test_empty_circuit_differs_from_the_model(tiny_model, data):
    """Ablating every head with ABC means changes the logit difference (the hook bites)."""
    clean, corrupted = data
    means = C.group_means(tiny_model, corrupted)
    ablated = C.run_circuit(tiny_model, C.Circuit({}, {}), clean, means)
    full = logit_diff(tiny_model(clean.tokens), clean)
    assert (ablated - full).abs().max() > 1e-3


def test_groups_align_positions(data):
    """Prompts in one group share the template and every named position."""
    clean, _ = data
    groups = C.alignment_groups(clean)
    for g in set(groups):
        at = groups == g
        assert len(set(clean.template_id[at])) == 1
        assert len(set(clean.end[torch.as_tensor(at)].tolist())) == 1


def test_keep_mask_marks_class_positions(tiny_model, data):
    """A class kept at S2 keeps its head at each prompt's S2 and nowhere else."""
    clean, _ = data
    circuit = C.Circuit({"induction": ((1, 2),)}, {"induction": "S2"})
    mask = C.keep_mask(tiny_model, circuit, clean)
    assert mask.sum() == len(clean)
    rows = torch.arange(len(clean))
    assert mask[1, rows, clean.positions["S2"], 2].all()


def test_per_template_rows_cover_every_template(tiny_model, data):
    """The per-template table has one row per template present, and the whole model is
    faithful on each of them."""
    clean, corrupted = data
    table = C.faithfulness_by_template(tiny_model, C.whole_model(tiny_model), clean, corrupted)
    assert sorted(table.template_id) == sorted(set(clean.template_id))
    np.testing.assert_allclose(table.faithfulness, 1.0, atol=1e-5)


def test_paper_circuit_loads_with_26_heads():
    """The shipped Wang et al. circuit has its 26 heads in 7 classes."""
    circuit = C.load_circuit()
    assert len(circuit.heads) == 26 and len(circuit.classes) == 7
    assert (9, 9) in circuit.classes["name mover"] and circuit.positions["induction"] == "S2"


def test_unknown_heads_are_refused(tiny_model):
    """A circuit naming a head the model lacks is a clear error."""
    with pytest.raises(ValueError, match="not in this model"):
        C.check_circuit(tiny_model, C.Circuit({"x": ((99, 0),)}, {"x": "END"}))


def test_completeness_and_minimality_tables(tiny_gpt2):
    """Completeness of the whole model is 0 for every K; minimality gives a row per head."""
    clean, corrupted = make_pair(tiny_gpt2, n=8)
    circuit = C.Circuit({"a": ((0, 1), (1, 0)), "b": ((2, 3),)}, {"a": "END", "b": "ALL"})
    table = C.completeness(tiny_gpt2, C.whole_model(tiny_gpt2), clean, corrupted, n_random=2, greedy_size=1)
    assert table.incompleteness.max() < 1e-5
    mini = C.minimality(tiny_gpt2, circuit, clean, corrupted)
    assert len(mini) == 3 and (mini.change >= 0).all()
