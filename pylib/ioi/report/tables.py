"""Tables the chapters need that combine analyses of a Study: the three path-patching steps in
one frame, the circuit as a graph (its heads, and one edge per head for the path-patching step
that put it in the circuit), the heads worth showing, attention patterns on one prompt, head
scores in long form, and the pooled name-order rows of the template follow-up.
They only read what a Study computed: a Study in, a tidy DataFrame out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ioi.circuits import paths_discovery


CLASS_ORDER = (
    "previous token", "duplicate token", "induction", "S-inhibition",
    "name mover", "backup name mover", "negative name mover", "other", "found",
)


PATH_STEPS = {
    # step: (Study method, receiving class, what is patched, the receivers' position)
    "logits": ("path_patching_to_logits", None, "logits", "END"),
    "name movers": ("path_patching_to_name_movers", "name mover", "queries", "END"),
    "S-inhibition": ("path_patching_to_s_inhibition", "S-inhibition", "values", "S2"),
}


def path_patching(study) -> pd.DataFrame:
    """The three path-patching sweeps in one frame, with a `receiver` column; a step whose
    receiving class the circuit lacks is skipped (nothing to receive the path)."""
    frames = []
    classes = study.circuit().classes
    for receiver, (method, cls, _, _) in PATH_STEPS.items():
        if cls is None or classes.get(cls):
            frames.append(getattr(study, method)().assign(receiver=receiver))
    return pd.concat(frames, ignore_index=True)


# What the diagram says each discovery step's path carries (`paths_discovery.RECEIVERS`).
CARRIES = {1: "direct paths", 2: "via queries at END", 3: "via values at S2", 4: "via keys at S1+1"}
DISCOVERY_STEPS = {step: (receiver, receiver_input, position, CARRIES[step])
                   for step, (receiver, receiver_input, position) in paths_discovery.RECEIVERS.items()}


def circuit_graph(study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's circuit as a graph (`graph_from_paths` of `Study.circuit_paths`)."""
    return graph_from_paths(study.circuit_paths())


def graph_from_paths(paths: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (one per head: `id`, `layer`, `head`, `class`, `step`, `effect`, `check`, `flagged`)
    and edges (one per head whose path was measured: `source`, the receiving class `target` or
    "logits", `step`, what the path `carries`, its `effect` as a share of the logit difference,
    `size` = |effect|, `sign`), from a table in the discovery's columns (`Study.circuit_paths`).

    A path-patching step measures a sender against a whole receiving class at once, so an edge
    runs from a head to a class, not to one head of it. `flagged` marks the heads that failed
    their class's attention or copy-score check (`check` False); None means not checked."""
    paths = paths.drop_duplicates(["layer", "head"]).sort_values(["layer", "head"])
    check = paths["check"] if "check" in paths else pd.Series(None, index=paths.index, dtype=object)
    nodes = pd.DataFrame({
        "id": paths.layer.astype(int).astype(str) + "." + paths["head"].astype(int).astype(str),
        "layer": paths.layer.astype(int), "head": paths["head"].astype(int), "class": paths["class"],
        "step": paths.step, "effect": paths.effect.astype(float), "check": check.astype(object),
    }).reset_index(drop=True)
    nodes["flagged"] = nodes["check"].map(lambda c: c is not None and not pd.isna(c) and not bool(c))
    present = set(nodes["class"]) | {"logits"}
    rows = []
    for node in nodes.itertuples():
        step = None if pd.isna(node.step) else int(node.step)
        if step not in DISCOVERY_STEPS or pd.isna(node.effect) or DISCOVERY_STEPS[step][0] not in present:
            continue
        target, _, _, carries = DISCOVERY_STEPS[step]
        rows.append({"source": node.id, "target": target, "step": step, "carries": carries, "effect": node.effect})
    edges = pd.DataFrame(rows, columns=["source", "target", "step", "carries", "effect"])
    edges = edges.assign(size=edges.effect.abs(), sign=np.where(edges.effect >= 0, "helps IO", "hurts IO"))
    return nodes, edges


def backup_risers(study, k: int = 8) -> pd.DataFrame:
    """The `k` heads whose direct effect rises most when the name movers are knocked out
    (`ioi.claims_table.backup_tables`), as shares of the logit difference, with whether each passes
    the name-mover check; an empty table when the circuit has no name movers."""
    from ioi.circuits import classes
    from ioi.claims_table import backup_tables

    columns = ["head", "before", "after", "rise", "95% CI", "name mover?"]
    per_prompt, rises = backup_tables(study)
    if rises is None:
        return pd.DataFrame(columns=columns)
    ld = float(per_prompt.logit_diff_before.mean())
    top = rises.head(k).merge(study.head_scores(), on=["layer", "head"])
    movers = classes.members(top, "name mover", classes.load_rules())
    share = lambda x: [f"{100 * v / ld:.0f}%".replace("-", "−") for v in x]  # noqa: E731
    return pd.DataFrame({
        "head": top.layer.astype(str) + "." + top["head"].astype(str), "before": share(top.before),
        "after": share(top.after), "rise": share(top.rise),
        "95% CI": [f"[{a}, {b}]" for a, b in zip(share(top.rise_ci_low), share(top.rise_ci_high))],
        "name mover?": np.where(movers, "yes", "no"),
    }, columns=columns)


def circuit_heads(study) -> pd.DataFrame:
    """The circuit's heads, one row per class: how many, and every one of them by layer (the
    diagram's heads as a table)."""
    frame = study.circuit().to_frame().sort_values(["layer", "head"])
    order = [c for c in CLASS_ORDER if c in set(frame["class"])] + sorted(set(frame["class"]) - set(CLASS_ORDER))
    rows = []
    for c in order:
        members = frame[frame["class"] == c]
        rows.append({"class": c, "heads": len(members),
                     "layer.head": ", ".join(f"{l}.{h}" for l, h in zip(members.layer, members["head"]))})
    return pd.DataFrame(rows, columns=["class", "heads", "layer.head"])


def key_heads(study, k: int = 4) -> list[tuple[int, int]]:
    """One head per class, in the circuit's reading order from END back (at most k)."""
    classes = study.circuit().classes
    order = ("name mover", "S-inhibition", "induction", "duplicate token", "previous token", "negative name mover")
    picks = [classes[c][0] for c in order if classes.get(c)]
    picks += [h for hs in classes.values() for h in hs if h not in picks]
    return picks[:k]


SCORES = ("previous_token_random", "duplicate_token_random", "induction_random", "end_to_io", "end_to_s", "copy_score",
          "negative_copy_score")


def scores_long(study) -> pd.DataFrame:
    """Head scores in long form (head, class, score, value); heads outside the circuit are
    classed "not in circuit"."""
    classes = study.circuit().to_frame()
    classes = classes.drop_duplicates(["layer", "head"])[["layer", "head", "class"]] if len(classes) else None
    scores = study.head_scores()
    if classes is not None:
        scores = scores.merge(classes, on=["layer", "head"], how="left")
    scores = scores.assign(head_name=scores.layer.astype(str) + "." + scores["head"].astype(str))
    scores["class"] = scores.get("class", pd.Series(index=scores.index, dtype=object)).fillna("not in circuit")
    long = scores.melt(id_vars=["head_name", "class"], value_vars=list(SCORES), var_name="score")
    return long.rename(columns={"head_name": "head"})


def order_summary(sweep: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """The pooled ABBA row, the pooled BABA row and their difference, from `template_sweep`."""
    at = sweep[sweep.level != "template"].set_index("order")
    return at.loc["ABBA"], at.loc["BABA"], at.loc["ABBA-BABA"]


def completeness_table(frame: pd.DataFrame, max_listed: int = 6) -> pd.DataFrame:
    """`Study.completeness` for print: a subset K of more than `max_listed` heads is given by
    its size (a random half of a large circuit would fill half a page), the rest by name."""
    sizes = frame.K.fillna("").str.split().str.len()
    shown = np.where(sizes > max_listed, sizes.astype(str) + " heads", frame.K.fillna(""))
    return frame.assign(K=shown)[["subset", "K", "F_C_minus_K", "F_M_minus_K", "incompleteness"]]


def minimality_table(frame: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """`Study.minimality` for print: every head of a small circuit; of a large one, the `k`
    heads whose removal changes F(C) most and the `k` that change it least (the heads that
    matter for the verdict), ordered by that change. `ioi reproduce` writes every row."""
    frame = frame.sort_values("relative_change", ascending=False)
    if len(frame) > 2 * k + 2:
        frame = pd.concat([frame.head(k), frame.tail(k)])
    frame = frame.assign(head=frame.layer.astype(str) + "." + frame["head"].astype(str))
    return frame[["head", "class", "K", "F_before", "F_after", "relative_change"]]
