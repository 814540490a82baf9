"""Finding an IOI circuit in a model where nobody has drawn one, by one fixed procedure.

The paper found GPT-2 small's circuit by hand, over many experiments. To compare models we need
a procedure that runs the same way on each, so we use a simple, stated one:

1. Rank heads by how much patching their clean output into the ABC run (all positions) moves
   the normalised metric, in absolute value.
2. Keep the top k heads at every position and mean-ablate the rest (per-template ABC means);
   find the smallest k whose faithfulness F(C)/F(M) reaches the target, by bisection over k
   (faithfulness grows with k in practice; where it does not, bisection still returns a k that
   meets the target, just not always the smallest).
3. Name each kept head after the paper's classes, from its scores: a direct effect on the logit
   difference makes it a (negative) name mover; attending from END to S makes it S-inhibition;
   otherwise its strongest of the induction, duplicate-token and previous-token scores decides.
"""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from ioi.circuits.criteria import Circuit, circuit_logit_diffs, mean_ablation, whole_model

DIRECT_SHARE = 0.1  # |DLA| above this share of the logit difference counts as a direct effect
ATTENTION_FLOOR = 0.1  # a head is called induction/duplicate/previous only above this score


def find_circuit(model, clean, corrupted, head_patching: pd.DataFrame, target: float = 0.8) -> pd.DataFrame:
    """The heads ranked by patching effect, with `in_circuit` marking the smallest top-k
    reaching the target faithfulness, and `faithfulness` at each k bisection evaluated."""
    ranked = head_patching.assign(size=head_patching.patched_metric.abs())
    ranked = ranked.sort_values("size", ascending=False, ignore_index=True)
    heads = [(int(l), int(h)) for l, h in zip(ranked.layer, ranked["head"])]
    ablation = mean_ablation(model, clean, corrupted)
    f_m = circuit_logit_diffs(model, [whole_model(model)], clean, ablation).mean()

    def faith(k: int) -> float:
        circuit = Circuit({"found": tuple(heads[:k])}, {"found": "ALL"})
        return float(circuit_logit_diffs(model, [circuit], clean, ablation).mean() / f_m)

    evaluated = {}
    low, high = 0, len(heads)  # faith(len(heads)) is 1: nothing is ablated
    with tqdm(desc="finding the circuit", leave=False) as progress:
        while high - low > 1:
            mid = (low + high) // 2
            evaluated[mid] = faith(mid)
            low, high = (low, mid) if evaluated[mid] >= target else (mid, high)
            progress.update()
    evaluated.setdefault(high, faith(high))
    ranked["rank"] = range(1, len(ranked) + 1)
    ranked["in_circuit"] = ranked["rank"] <= high
    ranked["faithfulness"] = ranked["rank"].map(evaluated)
    return ranked.drop(columns="size")


def head_class(scores: pd.Series, dla: float, logit_diff: float) -> str:
    """The paper's class that fits one head's scores best (see the module docstring)."""
    if abs(dla) >= DIRECT_SHARE * abs(logit_diff):
        return "name mover" if dla > 0 else "negative name mover"
    if scores.end_to_s > max(scores.end_to_io, ATTENTION_FLOOR):
        return "S-inhibition"
    kinds = {"induction": scores.induction, "duplicate token": scores.duplicate_token,
             "previous token": scores.previous_token}
    best = max(kinds, key=kinds.get)
    return best if kinds[best] >= ATTENTION_FLOOR else "other"


def classify_heads(
    found: pd.DataFrame, head_scores: pd.DataFrame, attributions: pd.DataFrame, logit_diff: float
) -> Circuit:
    """A Circuit of the found heads, grouped by class, each kept at every position.
    `attributions` is the per-head DLA table; `logit_diff` the model's mean logit difference."""
    scores = head_scores.set_index(["layer", "head"])
    dla = attributions.set_index(["layer", "head"])["mean"]
    classes: dict[str, list] = {}
    for layer, head in zip(found.layer, found["head"]):
        key = (int(layer), int(head))
        classes.setdefault(head_class(scores.loc[key], dla.loc[key], logit_diff), []).append(key)
    return Circuit({c: tuple(h) for c, h in classes.items()}, {c: "ALL" for c in classes})
