"""Tables the chapters need that combine analyses of a Study: the three path-patching steps in
one frame, the circuit as a graph (nodes placed by layer and class, edges from path patching),
the heads worth showing, attention patterns on one prompt, head scores in long form, the
and the pooled name-order rows of the template follow-up.
Compute only: a Study in, a tidy DataFrame out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ioi.engines.hooks import run_with_cache


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


MAX_LABELLED = 30  # a diagram with more heads than this names only the strongest of each class


def circuit_graph(study, min_effect: float = 0.02, max_senders: int | None = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (circuit heads and the logits, placed by layer and class) and edges measured by
    path patching, with strength = the share of the logit difference the path carries.

    A path-patching sweep measures a sender against a whole receiving class at once, so an
    edge is drawn from the sender to each head of that class, all with the same strength.
    Edges weaker than `min_effect`, and senders beyond the `max_senders` strongest of each
    step, are dropped to keep the diagram readable. A node's `strength` is its strongest path;
    `labelled` marks the heads worth naming: all of them in a small circuit, else the two
    strongest of each class (every head is listed by `circuit_heads`)."""
    circuit = study.circuit()
    nodes = _place_nodes(circuit.to_frame(), study.model.cfg.n_layers)
    sweeps = path_patching(study)
    sweeps = sweeps.assign(source=sweeps.layer.astype(str) + "." + sweeps["head"].astype(str))
    sweeps = sweeps.assign(strength=-sweeps.relative_change)  # patching a path that helps lowers the logit difference
    sweeps = sweeps[sweeps.source.isin(nodes.id)].assign(size=lambda f: f.strength.abs())
    nodes = _mark_labelled(nodes.assign(strength=nodes.id.map(sweeps.groupby("source")["size"].max()).fillna(0.0)))
    sweeps = sweeps[sweeps["size"] >= min_effect].sort_values("size", ascending=False)
    if max_senders is not None:
        sweeps = sweeps.groupby("receiver", sort=False).head(max_senders)
    targets = {step: ["logits"] if cls is None else nodes.id[nodes["class"] == cls].tolist()
               for step, (_, cls, _, _) in PATH_STEPS.items()}
    edges = [
        {"source": row.source, "target": target, "receiver": row.receiver, "strength": row.strength}
        for row in sweeps.itertuples() for target in targets[row.receiver] if target != row.source
    ]
    edges = pd.DataFrame(edges, columns=["source", "target", "receiver", "strength"])
    at = nodes.set_index("id")[["x", "y"]]
    edges = edges.join(at, on="source").join(at.rename(columns={"x": "x2", "y": "y2"}), on="target")
    return nodes, edges.assign(sign=np.where(edges.strength >= 0, "helps IO", "hurts IO"), size=edges.strength.abs())


def _mark_labelled(nodes: pd.DataFrame, per_class: int = 2) -> pd.DataFrame:
    heads = nodes[nodes["class"] != "logits"]
    if len(heads) <= MAX_LABELLED:
        return nodes.assign(labelled=True)
    top = heads.sort_values(["strength", "layer"], ascending=[False, False]).groupby("class").head(per_class).id
    return nodes.assign(labelled=nodes.id.isin(top) | (nodes["class"] == "logits"))


def circuit_heads(study) -> pd.DataFrame:
    """The circuit's heads, one row per class: how many, and every one of them by layer (the
    complete list, for when the diagram names only the strongest)."""
    frame = study.circuit().to_frame().sort_values(["layer", "head"])
    order = [c for c in CLASS_ORDER if c in set(frame["class"])] + sorted(set(frame["class"]) - set(CLASS_ORDER))
    rows = []
    for c in order:
        members = frame[frame["class"] == c]
        rows.append({"class": c, "heads": len(members),
                     "layer.head": ", ".join(f"{l}.{h}" for l, h in zip(members.layer, members["head"]))})
    return pd.DataFrame(rows, columns=["class", "heads", "layer.head"])


def _place_nodes(frame: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """x = layer, y = class row; heads of one class in one layer are stacked a little apart."""
    order = [c for c in CLASS_ORDER if c in set(frame["class"])] + sorted(set(frame["class"]) - set(CLASS_ORDER))
    frame = frame.assign(row=frame["class"].map(order.index)).sort_values(["row", "layer", "head"])
    slot = frame.groupby(["row", "layer"]).cumcount()
    width = frame.groupby(["row", "layer"])["head"].transform("size")
    nodes = frame.assign(
        id=frame.layer.astype(str) + "." + frame["head"].astype(str),
        x=frame.layer.astype(float),
        y=frame.row + (slot - (width - 1) / 2) * np.minimum(0.22, 0.8 / width),  # a crowded cell stays in its row
    )
    logits = {"id": "logits", "class": "logits", "layer": n_layers, "head": -1, "x": float(n_layers),
              "y": (len(order) - 1) / 2, "row": -1}
    return pd.concat([nodes, pd.DataFrame([logits])], ignore_index=True)[["id", "class", "layer", "head", "x", "y", "row"]]


def key_heads(study, k: int = 4) -> list[tuple[int, int]]:
    """One head per class, in the circuit's reading order from END back (at most k)."""
    classes = study.circuit().classes
    order = ("name mover", "S-inhibition", "induction", "duplicate token", "previous token", "negative name mover")
    picks = [classes[c][0] for c in order if classes.get(c)]
    picks += [h for hs in classes.values() for h in hs if h not in picks]
    return picks[:k]


@torch.inference_mode()
def attention_patterns(study, hs, prompt: int = 0) -> pd.DataFrame:
    """Attention of each head in `hs` on one clean prompt (its real tokens only, no padding):
    one row per (head, query, key)."""
    one = study.clean.subset(np.arange(len(study.clean)) == prompt)
    end = int(one.end[0]) + 1
    names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in hs})
    _, cache = run_with_cache(study.model, one, names)
    tokens = [f"{i}:{study.model.tokenizer.decode([t])}" for i, t in enumerate(one.tokens[0, :end].tolist())]
    rows = []
    for l, h in hs:
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0, h, :end, :end]
        for q in range(end):
            for k in range(q + 1):
                rows.append({"head": f"{l}.{h}", "query": tokens[q], "key": tokens[k], "query_pos": q, "key_pos": k,
                             "attention": float(pattern[q, k])})
    return pd.DataFrame(rows)


SCORES = ("previous_token", "duplicate_token", "induction", "end_to_io", "end_to_s", "copy_score", "negative_copy_score")


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


def second_study(model: str, main, n: int, n_path: int) -> tuple[object | None, Exception | None]:
    """The Study of a follow-up's second model, or (None, why not): a follow-up never repeats
    the main study's model, and a model that is unknown or cannot be loaded here is reported,
    not raised, so the section can say so in a sentence."""
    from ioi.engines.check import UnsupportedModelError, check_supported
    from ioi.models import ModelUnavailableError
    from ioi.study import Study, StudyConfig

    if not model or model == main.config.model:
        return None, None
    try:
        study = Study(StudyConfig(model=model, n=n, seed=main.config.seed, n_path=min(n, n_path)))
    except (ModelUnavailableError, ValueError) as error:
        return None, error
    try:  # a render runs only what the fast engines compute exactly; the hooks take hours here
        check_supported(study.model)
    except UnsupportedModelError as error:
        return None, error
    return study, None


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
