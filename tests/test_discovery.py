"""Circuit discovery: the found circuit meets its target; classes follow the stated rules."""

import pandas as pd
import pytest
from conftest import make_pair

from ioi.circuits import discovery
from ioi.circuits.criteria import Circuit, faithfulness
from ioi.engines.hooks import patch_head_outputs


def _scores(**overrides):
    base = {"end_to_io": 0.0, "end_to_s": 0.0, "induction": 0.0, "duplicate_token": 0.0, "previous_token": 0.0}
    return pd.Series({**base, **overrides})


@pytest.mark.parametrize(
    "scores, dla, expected",
    [
        (_scores(end_to_io=0.6), 1.0, "name mover"),
        (_scores(end_to_io=0.6), -1.0, "negative name mover"),
        (_scores(end_to_s=0.5, end_to_io=0.1), 0.0, "S-inhibition"),
        (_scores(induction=0.4, duplicate_token=0.2), 0.0, "induction"),
        (_scores(duplicate_token=0.3), 0.0, "duplicate token"),
        (_scores(previous_token=0.9), 0.0, "previous token"),
        (_scores(previous_token=0.05), 0.0, "other"),
    ],
)
def test_head_classes_follow_the_rules(scores, dla, expected):
    assert discovery.head_class(scores, dla, logit_diff=3.0) == expected


def test_found_circuit_reaches_its_target(tiny_gpt2):
    """The circuit that find_circuit marks reaches the target faithfulness, and one head fewer
    (in rank order) was evaluated below it unless the circuit is a single head."""
    clean, corrupted = make_pair(tiny_gpt2, n=10)
    table = discovery.find_circuit(
        tiny_gpt2, clean, corrupted, patch_head_outputs(tiny_gpt2, clean, corrupted), target=0.9
    )
    k = int(table.in_circuit.sum())
    heads = tuple(zip(table.layer[:k], table["head"][:k]))
    reached = faithfulness(tiny_gpt2, Circuit({"c": heads}, {"c": "ALL"}), clean, corrupted)
    assert reached["faithfulness"] >= 0.9
    assert table.faithfulness.iloc[k - 1] == pytest.approx(reached["faithfulness"], abs=1e-6)
    if k > 1:
        assert table.faithfulness.iloc[k - 2] < 0.9
