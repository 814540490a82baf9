"""A circuit found the paper's way: backwards from the answer, by path patching.

Wang et al. 2022 (§3, Figure 2 and Appendix B) did not rank heads by one score; they walked back
from the logits, each step asking which heads matter *through one path*:

1. Direct paths to the logits: heads whose own output, patched from the ABC run into the direct
   path, lowers the logit difference are name movers; those that raise it, negative name movers.
2. Paths into the name movers' queries at END: S-inhibition heads (they tell the name movers
   which name not to copy).
3. Paths into the S-inhibition heads' values at S2: induction and duplicate-token heads (they
   detect that S is repeated).
4. Paths into the induction heads' keys at S1+1: previous-token heads.

Each step keeps the senders whose path carries at least a stated share of the clean logit
difference (`PathsConfig`). The path decides a head's class; the attention and copy scores of
`ioi.analyses.head_scores` then *check* it (a name mover should attend END->IO more than END->S2
and copy names; an S-inhibition head should attend END->S2 more than END->IO; ...). A head that
fails its check stays in the circuit under the class its path gave, with the failure written in
its row: the path shows it matters there, and a silent reclassification would hide exactly the
disagreement a reader needs to see. Step 3 decides between induction and duplicate token by the
larger of the two scores, since both send through the same path.

Conventions (stated, not tuned on any model's results):
- A path's effect is -(patched - clean) / clean logit difference, so positive means the path
  carries the task. Step 1 keeps both signs (|effect| >= share); steps 2-4 keep heads whose
  path helps (effect >= share), as the paper's figures do.
- Senders are all heads in layers before the last receiver, each patched into the receivers in
  later layers than its own (a head between two name movers can only reach the later one). That
  is one `fast_paths.path_patch_sweep` per distinct receiver layer, each over only the sender
  layers it owns (`first_layer`), so a step costs one sweep's worth of senders in all.
- A head found again at a later step keeps its first class (its later row says so).
- Mean-ablation positions follow data/circuits/wang2022_gpt2_small.json: END for name movers,
  negative name movers and S-inhibition heads, S2 for induction and duplicate-token heads, S1+1
  for previous-token heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from ioi.circuits.criteria import Circuit

Head = tuple[int, int]
# sweep(receivers, receiver_input, receiver_position, first_layer) -> a `fast_paths.path_patch_sweep`
# frame, senders from first_layer up to the first receiver's layer
Sweep = Callable[..., pd.DataFrame]

POSITIONS = {
    "name mover": "END",
    "negative name mover": "END",
    "S-inhibition": "END",
    "induction": "S2",
    "duplicate token": "S2",
    "previous token": "S1+1",
}
SCORE_COLUMNS = ["end_to_io", "end_to_s", "copy_score", "negative_copy_score",
                 "induction", "duplicate_token", "previous_token"]
COLUMNS = ["layer", "head", "class", "step", "receivers", "effect", *SCORE_COLUMNS, "check", "kept", "why"]


@dataclass(frozen=True)
class PathsConfig:
    """The share of the clean logit difference a path must carry to keep its sender, per step."""

    # Step 1: each of the paper's name movers and negative name movers moves the logit
    # difference by well over 5% through its direct path (Wang et al. Fig. 3); backup heads less.
    logits_share: float = 0.05
    # Step 2: the paper's S-inhibition heads each carry several percent into the name movers'
    # queries; 5% keeps the clear ones.
    queries_share: float = 0.05
    # Steps 3 and 4 act two and three paths away from the answer, so each path carries less.
    values_share: float = 0.02
    keys_share: float = 0.02
    # An induction, duplicate-token or previous-token head should put at least this much
    # attention where its class looks (the scores are mean attention probabilities).
    attention_floor: float = 0.1


def paper_way_circuit(sweep: Sweep, scores: pd.DataFrame, config: PathsConfig = PathsConfig()) -> pd.DataFrame:
    """The four steps, one row per head over a step's threshold (see the module docstring).

    `sweep(receivers, receiver_input, receiver_position, first_layer)` runs one path-patching sweep
    (receivers "logits" or a sorted tuple of (layer, head)); `scores` is `head_scores.head_scores`'
    table."""
    scores = scores.set_index(["layer", "head"])
    rows: list[dict] = []

    def found(*classes: str) -> tuple[Head, ...]:
        return tuple(sorted((r["layer"], r["head"]) for r in rows if r["kept"] and r["class"] in classes))

    frame = sweep("logits", None, None, 0).assign(receivers="logits")
    rows += _step(frame, 1, config.logits_share, both_signs=True, scores=scores, taken=rows,
                  classify=lambda s, e: "name mover" if e > 0 else "negative name mover")
    steps = [
        (2, ("name mover",), "q", "END", config.queries_share, lambda s, e: "S-inhibition"),
        (3, ("S-inhibition",), "v", "S2", config.values_share,
         lambda s, e: "induction" if s.induction >= s.duplicate_token else "duplicate token"),
        (4, ("induction",), "k", "S1+1", config.keys_share, lambda s, e: "previous token"),
    ]
    for step, receiver_classes, receiver_input, position, share, classify in steps:
        receivers = found(*receiver_classes)
        if not receivers:
            continue
        frame = into_later_receivers(sweep, receivers, receiver_input, position)
        rows += _step(frame, step, share, both_signs=False, scores=scores, taken=rows, classify=classify)
    for row in rows:
        row["check"], row["why"] = _check(row, config.attention_floor, row["why"])
    return pd.DataFrame(rows, columns=COLUMNS)


def into_later_receivers(sweep: Sweep, receivers: tuple[Head, ...], receiver_input: str, position: str) -> pd.DataFrame:
    """Every head before the last receiver as a sender into the receivers after its layer."""
    layers = sorted({l for l, _ in receivers})
    frames = []
    for below, layer in zip([0] + layers[:-1], layers):
        later = tuple(r for r in receivers if r[0] >= layer)
        frame = sweep(later, receiver_input, position, below)
        label = f"{receiver_input} at {position} of " + " ".join(f"{l}.{h}" for l, h in later)
        frames.append(frame[frame.layer >= below].assign(receivers=label))
    return pd.concat(frames, ignore_index=True)


def _step(frame, step, share, both_signs, scores, taken, classify) -> list[dict]:
    """Rows for the senders of one sweep whose path effect reaches `share`, strongest first."""
    if frame.empty:
        return []
    effect = -frame.relative_change.astype(float)
    over = effect.abs() >= share if both_signs else effect >= share
    first_class = {(r["layer"], r["head"]): r["class"] for r in taken if r["kept"]}
    out = []
    for i in effect[over].abs().sort_values(ascending=False).index:
        head = (int(frame.layer[i]), int(frame["head"][i]))
        s = scores.loc[head]
        earlier = first_class.get(head)
        out.append({
            "layer": head[0], "head": head[1], "class": classify(s, effect[i]), "step": step,
            "receivers": frame.receivers[i], "effect": float(effect[i]), **{c: float(s[c]) for c in SCORE_COLUMNS},
            "kept": earlier is None,
            "why": _reason(effect[i], share, both_signs) if earlier is None else f"already a {earlier}",
        })
    return out


def _reason(effect: float, share: float, both_signs: bool) -> str:
    if both_signs:
        return f"|path effect| {abs(effect):.3f} >= {share} (effect {effect:+.3f})"
    return f"path effect {effect:+.3f} >= {share}"


def _check(row: dict, floor: float, why: str) -> tuple[bool, str]:
    """Whether the head's scores fit the class its path gave it, and why not when they do not."""
    cls, fails = row["class"], []
    if cls in ("name mover", "negative name mover"):
        if not row["end_to_io"] > row["end_to_s"]:
            fails.append(f"attends END->S2 ({row['end_to_s']:.2f}) at least as much as END->IO ({row['end_to_io']:.2f})")
        copies, negative = row["copy_score"], row["negative_copy_score"]
        if cls == "name mover" and not copies > negative:
            fails.append(f"copy score {copies:.2f} not above its negative copy score {negative:.2f}")
        if cls == "negative name mover" and not negative > copies:
            fails.append(f"negative copy score {negative:.2f} not above its copy score {copies:.2f}")
    elif cls == "S-inhibition":
        if not row["end_to_s"] > row["end_to_io"]:
            fails.append(f"attends END->IO ({row['end_to_io']:.2f}) at least as much as END->S2 ({row['end_to_s']:.2f})")
    else:
        score = {"induction": "induction", "duplicate token": "duplicate_token", "previous token": "previous_token"}[cls]
        if not row[score] >= floor:
            fails.append(f"{score} score {row[score]:.2f} below {floor}")
    if not fails:
        return True, why
    return False, why + "; kept, but its check failed: " + "; ".join(fails)


def to_circuit(table: pd.DataFrame) -> Circuit:
    """The kept heads by class, each class at its paper position (`POSITIONS`)."""
    kept = table[table.kept]
    classes = {
        cls: tuple(sorted((int(l), int(h)) for l, h in zip(group.layer, group["head"])))
        for cls, group in kept.groupby("class", sort=False)
    }
    return Circuit(classes, {cls: POSITIONS[cls] for cls in classes})


def ranking(table: pd.DataFrame, head_patching: pd.DataFrame) -> list[Head]:
    """Every head, in the procedure's order: circuit heads by step, then by |path effect|;
    then the rest by |activation patching| (`patched_metric`, all positions)."""
    kept = table[table.kept].assign(size=table.effect.abs()).sort_values(["step", "size"], ascending=[True, False])
    first = [(int(l), int(h)) for l, h in zip(kept.layer, kept["head"])]
    rest = head_patching.assign(size=head_patching.patched_metric.abs()).sort_values("size", ascending=False)
    return first + [h for h in ((int(l), int(h)) for l, h in zip(rest.layer, rest["head"])) if h not in set(first)]
