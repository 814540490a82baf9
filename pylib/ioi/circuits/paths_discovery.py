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
difference (`PathsConfig`). The path decides which class a head is a candidate for; the class's
definition (`ioi.circuits.classes`: attention and copy scores, random-token scores) then *checks*
it. A head that fails its check stays in the circuit under the class its path gave, flagged, with
the failure written in its row: the path shows it matters there, and a silent reclassification
would hide exactly the disagreement a reader needs to see. But only heads that pass their check
receive the next step's paths: a head that does not behave as a name mover is not asked which
heads inhibit it. Step 3 decides between induction and duplicate token by the larger of the two
random-token scores, since both send through the same path.

Conventions (stated, not tuned on any model's results):
- A path's effect is -(patched - clean) / clean logit difference, so positive means the path
  carries the task. Step 1 keeps both signs (|effect| >= share); steps 2-4 keep heads whose
  path helps (effect >= share), as the paper's figures do.
- Senders are all heads in layers before the last receiver, each patched into the receivers in
  later layers than its own (a head between two name movers can only reach the later one). That
  is one `fast_paths.path_patching` per distinct receiver layer, each over only the sender
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

from ioi.circuits import classes
from ioi.circuits.criteria import Circuit

Head = tuple[int, int]
# sweep(receivers, receiver_input, receiver_position, first_layer) -> a `fast_paths.path_patching`
# frame, senders from first_layer up to the first receiver's layer
Sweep = Callable[..., pd.DataFrame]

# The discovery step that finds each class (its candidates; their checks decide membership).
STEP_OF = {"name mover": 1, "negative name mover": 1, "S-inhibition": 2, "induction": 3, "duplicate token": 3,
           "previous token": 4}
# Each step's path: step -> (receiving class, the receivers' input, its position); step 1 reaches
# the logits directly.
RECEIVERS = {1: ("logits", None, "END"), 2: ("name mover", "q", "END"), 3: ("S-inhibition", "v", "S2"),
             4: ("induction", "k", "S1+1")}
POSITIONS = {
    "name mover": "END",
    "negative name mover": "END",
    "S-inhibition": "END",
    "induction": "S2",
    "duplicate token": "S2",
    "previous token": "S1+1",
}
SCORE_COLUMNS = ["end_to_io", "end_to_s", "copy_score", "negative_copy_score",
                 "induction_random", "duplicate_token_random", "previous_token_random"]
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


def paper_way_circuit(
    sweep: Sweep, scores: pd.DataFrame, config: PathsConfig = PathsConfig(), rules: classes.ClassRules | None = None,
    last_step: int = 4,
) -> pd.DataFrame:
    """The four steps, one row per head over a step's threshold (see the module docstring).

    `sweep(receivers, receiver_input, receiver_position, first_layer)` runs one path-patching sweep
    (receivers "logits" or a sorted tuple of (layer, head)); `scores` is `head_scores.head_scores`'
    table; `rules` the class definitions (`data/head_classes.json` by default). With `last_step`
    below 4 the later steps are not run: the rows are those of the full table's first steps."""
    rules = rules or classes.load_rules()
    scores = scores.set_index(["layer", "head"])
    rows: list[dict] = []

    def receivers_of(cls: str) -> tuple[Head, ...]:
        return tuple(sorted((r["layer"], r["head"]) for r in rows if r["kept"] and r["check"] and r["class"] == cls))

    frame = sweep("logits", None, None, 0).assign(receivers="logits")
    rows += _step(frame, 1, config.logits_share, both_signs=True, scores=scores, taken=rows, rules=rules,
                  classify=lambda s, e: "name mover" if e > 0 else "negative name mover")
    steps = [
        (2, "name mover", "q", "END", config.queries_share, lambda s, e: "S-inhibition"),
        (3, "S-inhibition", "v", "S2", config.values_share, lambda s, e: classes.induction_or_duplicate(s)),
        (4, "induction", "k", "S1+1", config.keys_share, lambda s, e: "previous token"),
    ]
    for step, receiving_class, receiver_input, position, share, classify in steps[: max(0, last_step - 1)]:
        receivers = receivers_of(receiving_class)
        if not receivers:
            continue
        frame = into_later_receivers(sweep, receivers, receiver_input, position)
        rows += _step(frame, step, share, both_signs=False, scores=scores, taken=rows, rules=rules, classify=classify)
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


def _step(frame, step, share, both_signs, scores, taken, rules, classify) -> list[dict]:
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
        earlier, cls = first_class.get(head), classify(s, effect[i])
        why = _reason(effect[i], share, both_signs) if earlier is None else f"already a {earlier}"
        fails = classes.failures(cls, s, rules)
        out.append({
            "layer": head[0], "head": head[1], "class": cls, "step": step,
            "receivers": frame.receivers[i], "effect": float(effect[i]), **{c: float(s[c]) for c in SCORE_COLUMNS},
            "check": not fails, "kept": earlier is None,
            "why": why + ("; kept, but not a " + cls + ": " + "; ".join(fails) if fails else ""),
        })
    return out


def _reason(effect: float, share: float, both_signs: bool) -> str:
    if both_signs:
        return f"|path effect| {abs(effect):.3f} >= {share} (effect {effect:+.3f})"
    return f"path effect {effect:+.3f} >= {share}"


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


def measured_paths(circuit: Circuit, sweep: Sweep) -> pd.DataFrame:
    """For a circuit given by hand (the paper's heads on GPT-2 small), the table the discovery
    would have written for it: each head's path for its class (`STEP_OF`; a backup name mover's
    is the direct one) into the circuit's own receivers of that step, from `sweep`, with `check`
    None (nothing was checked). A head whose class has no step, or whose step's receivers the
    circuit lacks, has no effect (NaN)."""
    effects = {}
    for step, (receiver, receiver_input, position) in RECEIVERS.items():
        if receiver == "logits":
            frame = sweep("logits", None, None, 0).assign(receivers="logits")
        elif circuit.classes.get(receiver):
            frame = into_later_receivers(sweep, tuple(sorted(circuit.classes[receiver])), receiver_input, position)
        else:
            continue
        for row in frame.itertuples():
            effects[step, int(row.layer), int(row.head)] = (-float(row.relative_change), row.receivers)
    steps = {**STEP_OF, "backup name mover": 1}
    heads = circuit.to_frame().drop_duplicates(["layer", "head"])
    rows = []
    for cls, layer, head in zip(heads["class"], heads.layer, heads["head"]):
        step = steps.get(cls)
        effect, receivers = effects.get((step, layer, head), (float("nan"), ""))
        rows.append({"layer": layer, "head": head, "class": cls, "step": step, "receivers": receivers,
                     "effect": effect, "check": None, "kept": True})
    return pd.DataFrame(rows, columns=["layer", "head", "class", "step", "receivers", "effect", "check", "kept"])
