"""What makes a head a name mover, an S-inhibition head, an induction head, ...: one definition.

Wang et al. 2022 (§3) find each class in two steps: a path-patching experiment says which heads
matter through a given path (into the logits, the name movers' queries, ...), and a second,
independent test says what those heads do: name movers attend from END to IO and copy names
(copy score, §3.1); S-inhibition heads attend from END to S2 (§3.2); induction and
duplicate-token heads show their pattern on sequences of random tokens repeated twice (§3.3).

This module is the second test, once, for everyone: the paper-way discovery
(`ioi.circuits.paths_discovery`) checks every head its paths find, the claims (`ioi.claims`) ask
which heads pass, and the follow-ups count them. The thresholds live in
`data/head_classes.json`, each with its reason, so that changing one is a visible change of
definition (and of every cached result that depends on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ioi.dataset import DATA_DIR

CLASSES_PATH = DATA_DIR / "head_classes.json"
CLASSES = ("previous token", "duplicate token", "induction", "S-inhibition", "name mover", "negative name mover")
# The score each random-token class is judged by (`ioi.analyses.head_scores.random_token_scores`).
RANDOM_SCORE = {"previous token": "previous_token_random", "duplicate token": "duplicate_token_random",
                "induction": "induction_random"}


@dataclass(frozen=True)
class ClassRules:
    attention_margin: float  # END->IO over END->S2 (movers), or the reverse (S-inhibition)
    copy_score: float  # share of names copied (negatively, for negative name movers)
    random_token_score: float  # attention on repeated random tokens where the class looks
    random_length: int  # tokens per random sequence, before it is repeated
    random_n: int  # random sequences


def load_rules(path: Path = CLASSES_PATH) -> ClassRules:
    spec = json.loads(Path(path).read_text())
    return ClassRules(
        attention_margin=spec["attention_margin"]["value"],
        copy_score=spec["copy_score"]["value"],
        random_token_score=spec["random_token_score"]["value"],
        random_length=spec["random_tokens"]["length"],
        random_n=spec["random_tokens"]["n"],
    )


def failures(cls: str, scores, rules: ClassRules) -> list[str]:
    """Why a head with these scores (a row of `head_scores.head_scores`) is not a member of
    `cls`; empty if it is."""
    margin, fails = rules.attention_margin, []
    if cls in ("name mover", "negative name mover"):
        if not scores["end_to_io"] - scores["end_to_s"] >= margin:
            fails.append(f"attends END->IO ({scores['end_to_io']:.2f}) less than {margin} above END->S2 ({scores['end_to_s']:.2f})")
        copy = "copy_score" if cls == "name mover" else "negative_copy_score"
        if not scores[copy] >= rules.copy_score:
            fails.append(f"{copy.replace('_', ' ')} {scores[copy]:.2f} below {rules.copy_score}")
    elif cls == "S-inhibition":
        if not scores["end_to_s"] - scores["end_to_io"] >= margin:
            fails.append(f"attends END->S2 ({scores['end_to_s']:.2f}) less than {margin} above END->IO ({scores['end_to_io']:.2f})")
    elif cls in RANDOM_SCORE:
        score = RANDOM_SCORE[cls]
        if not scores[score] >= rules.random_token_score:
            fails.append(f"{score.replace('_', ' ')} score {scores[score]:.2f} below {rules.random_token_score}")
    else:
        raise ValueError(f"No definition for class {cls!r}; known: {CLASSES}")
    return fails


def is_member(cls: str, scores, rules: ClassRules) -> bool:
    return not failures(cls, scores, rules)


def members(scores: pd.DataFrame, cls: str, rules: ClassRules) -> pd.Series:
    """A boolean per row of `scores` (one row per head): does the head pass `cls`'s check?"""
    return scores.apply(lambda row: is_member(cls, row, rules), axis=1).astype(bool)


def induction_or_duplicate(scores) -> str:
    """The class a sender into the S-inhibition heads' values takes: both kinds send through the
    same path, so the larger random-token score decides."""
    return "induction" if scores["induction_random"] >= scores["duplicate_token_random"] else "duplicate token"
