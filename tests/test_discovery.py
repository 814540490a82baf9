"""The smallest faithful top-k: the heads it marks reach the target, one head fewer does not."""

import pytest
from conftest import make_pair

from ioi.circuits import curve, discovery
from ioi.circuits.criteria import Circuit, faithfulness
from ioi.engines import hooks
from ioi.metrics import normalised


def test_smallest_top_k_reaches_its_target(tiny_gpt2):
    """The circuit that smallest_top_k marks reaches the target faithfulness, its recorded value
    is the criteria's, and one head fewer (in rank order) was evaluated below it unless the
    circuit is a single head."""
    clean, corrupted = make_pair(tiny_gpt2, n=10)
    runs = hooks.clean_and_corrupted(tiny_gpt2, clean, corrupted)
    patching = hooks.head_patching(tiny_gpt2, clean, corrupted)
    patching["patched_metric"] = normalised(patching.logit_diff, runs["clean_ld"], runs["corrupted_ld"])
    ranking = curve.by_size(patching, "patched_metric")
    table = discovery.smallest_top_k(tiny_gpt2, clean, corrupted, ranking, target=0.9)
    assert list(zip(table.layer, table["head"])) == ranking
    k = int(table.in_circuit.sum())
    heads = tuple(ranking[:k])
    reached = faithfulness(tiny_gpt2, Circuit({"c": heads}, {"c": "ALL"}), clean, corrupted)
    assert reached["faithfulness"] >= 0.9
    assert table.faithfulness.iloc[k - 1] == pytest.approx(reached["faithfulness"], abs=1e-6)
    if k > 1:
        assert table.faithfulness.iloc[k - 2] < 0.9
