"""Head classes: one definition, read from data/head_classes.json; each check passes and fails
exactly at its stated boundary."""

import pandas as pd
import pytest

from ioi.circuits import classes

RULES = classes.load_rules()


def row(**values):
    base = dict.fromkeys(["end_to_io", "end_to_s", "copy_score", "negative_copy_score", "previous_token_random",
                          "duplicate_token_random", "induction_random"], 0.0)
    return pd.Series(base | values)


@pytest.mark.parametrize("cls, passing, failing", [
    ("name mover", row(end_to_io=0.5, end_to_s=0.39, copy_score=RULES.copy_score),
     row(end_to_io=0.5, end_to_s=0.41, copy_score=0.9)),
    ("name mover", row(end_to_io=0.5, copy_score=0.6), row(end_to_io=0.5, copy_score=0.57, negative_copy_score=0.9)),
    ("negative name mover", row(end_to_io=0.5, negative_copy_score=0.6), row(end_to_io=0.5, copy_score=0.9)),
    ("S-inhibition", row(end_to_s=0.5, end_to_io=0.39), row(end_to_s=0.5, end_to_io=0.41)),
    ("induction", row(induction_random=RULES.random_token_score), row(induction_random=0.29, duplicate_token_random=0.9)),
    ("duplicate token", row(duplicate_token_random=0.31), row(duplicate_token_random=0.29, induction_random=0.9)),
    ("previous token", row(previous_token_random=0.9), row(previous_token_random=0.29)),
])
def test_each_check_at_its_boundary(cls, passing, failing):
    assert classes.is_member(cls, passing, RULES)
    assert not classes.is_member(cls, failing, RULES)
    assert classes.failures(cls, failing, RULES)  # and it says why


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="No definition"):
        classes.failures("backup name mover", row(), RULES)


def test_members_marks_rows():
    frame = pd.DataFrame([row(previous_token_random=0.9), row()])
    assert classes.members(frame, "previous token", RULES).tolist() == [True, False]


def test_senders_into_values_take_the_larger_random_score():
    assert classes.induction_or_duplicate(row(induction_random=0.4, duplicate_token_random=0.3)) == "induction"
    assert classes.induction_or_duplicate(row(induction_random=0.3, duplicate_token_random=0.4)) == "duplicate token"
