"""The paper's findings as predicates that can be tested on any model.

Wang et al. 2022 make two kinds of claim. Numeric ones (a logit difference of 3.56, head 9.9's
direct effect) only mean something on GPT-2 small; `ioi.report.scorecard` judges those. The rest
describe a mechanism and what follows from it: a few late heads write the answer; they attend to
IO and copy it; earlier heads tell them which name to avoid, mostly by position; those are fed
by induction and duplicate-token heads, which previous-token heads feed; backup heads take over
when the name movers are knocked out; the circuit is faithful, complete and minimal; an extra
mention of IO fools the model; and the MLPs matter. Restated as predicates over the study's
tables, each can be tested on any model and gets a verdict: "reproduced", "partly", "not
reproduced" or "not measured".

Each predicate is a pure function of DataFrames (so a test can hand it made-up tables and see
every verdict) and of thresholds that `data/claims.json` fixes, with the rule in words and a
sentence per verdict (and, where a verdict has more than one cause, per cause). Head classes are
`ioi.circuits.classes`' one definition. `ioi.claims_table.claims(study)` gathers the tables
from a `Study`, applies every predicate and returns one row per claim; the chapters print the
sentence that the verdict picked, so no sentence can contradict the number beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from jaxtyping import Float

from ioi.circuits import classes, criteria
from ioi.metrics import bootstrap_ci

VERDICTS = ("reproduced", "partly", "not reproduced", "not measured")


@dataclass(frozen=True)
class Finding:
    """A predicate's verdict, the number it rests on (with its 95% CI where one exists) and the
    facts its sentence names (head lists, counts, shares); `case` picks among a verdict's
    sentences where it has more than one cause."""

    verdict: str
    value: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    unit: str = "share"  # how the value reads: "share" (0-1), "depth" (0-1 of the layers) or "logit"
    facts: dict = field(default_factory=dict)
    case: str | None = None

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


NOT_MEASURED = Finding("not measured")
# A claim that divides by the logit difference (or by a mean before an intervention) means
# nothing when the model does not prefer IO on average: such claims are not judged.
NO_PREFERENCE = Finding("not measured", case="no preference")


def _labels(frame: pd.DataFrame) -> list[str]:
    return [f"{int(l)}.{int(h)}" for l, h in zip(frame.layer, frame["head"])]


def _relative_depth(layer, n_layers: int):
    return np.asarray(layer, dtype=float) / max(n_layers - 1, 1)


def _logits(x: float) -> str:
    """A logit difference for a sentence, with a true minus sign (and no −0.00)."""
    return f"{x:.2f}".replace("-", "−").replace("−0.00", "0.00")


def _grade(first, second) -> str:
    """Both conditions: reproduced; one: partly; neither: not reproduced."""
    first, second = bool(first), bool(second)
    return "reproduced" if first and second else "partly" if first or second else "not reproduced"


def _beyond(low: float, threshold: float) -> str:
    """An effect judged on its lower 95% limit: beyond `threshold` (half the paper's effect, or
    most of it), reproduced; above zero, partly; else not reproduced."""
    return "reproduced" if low >= threshold else "partly" if low > 0 else "not reproduced"


def _fall(after, before, seed: int) -> tuple[float, float, float]:
    """1 - mean(after) / mean(before) over prompts, with a 95% paired bootstrap interval
    (callers check that mean(before) > 0: a fall from a negative mean reads backwards)."""
    low, high = criteria.ratio_ci(after, before, seed)
    return 1 - float(np.mean(after) / np.mean(before)), 1 - high, 1 - low


def _members(frame: pd.DataFrame, cls: str, rules: classes.ClassRules) -> pd.Series:
    return classes.members(frame, cls, rules) if len(frame) else pd.Series(dtype=bool)


# --- The behaviour and the heads that write the answer (§2, §3.1) ---------------------------


def behaviour(baseline_summary: pd.DataFrame, reproduced_low: float, partly_mean: float) -> Finding:
    """IO beats S on nearly all prompts (`Study.baseline_summary`, metric io_beats_s)."""
    row = baseline_summary.set_index("metric").loc["io_beats_s"]
    verdict = "reproduced" if row.ci_low >= reproduced_low else "partly" if row["mean"] >= partly_mean else "not reproduced"
    return Finding(verdict, row["mean"], row.ci_low, row.ci_high)


def direct_writers(
    per_prompt_dla: pd.DataFrame, n_layers: int, top_share: float, min_carried: float, min_late: float,
    late_depth: float,
) -> Finding:
    """The top `top_share` of heads by |mean DLA| carry at least `min_carried` of all heads' |DLA|
    (judged on the lower limit of a 95% jackknife interval over prompts), and at least `min_late` of them sit at
    relative depth >= `late_depth`. `per_prompt_dla`: prompt_index, layer, head, dla."""
    wide = per_prompt_dla.pivot_table(index="prompt_index", columns=["layer", "head"], values="dla")
    values = wide.to_numpy()  # [prompt, head]
    k = max(1, int(round(top_share * values.shape[1])))

    def carried(means: Float[np.ndarray, "*sample head"]) -> Float[np.ndarray, "*sample"]:
        size = np.abs(means)
        top = -np.sort(-size, axis=-1)[..., :k]
        return np.asarray(top.sum(-1) / size.sum(-1))

    # A jackknife interval over prompts: resampling with replacement inflates every small head's
    # |mean| and so biases a share of |means| downward (percentile bootstrap intervals here can
    # miss the point estimate); leaving one prompt out barely does.
    n = len(values)
    leave_one_out = (values.sum(0) - values) / (n - 1)  # [prompt, head]: the means without each prompt
    point = float(carried(values.mean(0)))
    jack = carried(leave_one_out)
    se = float(np.sqrt((n - 1) / n * ((jack - jack.mean()) ** 2).sum()))
    low, high = point - 1.96 * se, point + 1.96 * se
    order = np.argsort(-np.abs(values.mean(0)))[:k]
    top = pd.DataFrame(list(wide.columns[order]), columns=["layer", "head"])
    late = int((_relative_depth(top.layer, n_layers) >= late_depth).sum())
    verdict = _grade(low >= min_carried, late >= min_late * k)
    return Finding(verdict, point, low, high, facts={"k": k, "heads": _labels(top), "late": late})


def name_movers(dla: pd.DataFrame, scores: pd.DataFrame, rules: classes.ClassRules, k: int, paper_copy: float) -> Finding:
    """Of the k heads with the largest positive mean DLA, how many are name movers by the class
    definition; reproduced if all k are, each with a copy score at the paper's level."""
    top = dla[dla["mean"] > 0].nlargest(k, "mean").merge(scores, on=["layer", "head"])
    if not len(top):
        return NOT_MEASURED
    member = _members(top, "name mover", rules)
    at_paper_strength = member & (top.copy_score >= paper_copy)
    n = int(member.sum())
    verdict = "reproduced" if len(top) == k and at_paper_strength.all() else "partly" if n else "not reproduced"
    return Finding(verdict, n / k, facts={
        "k": k, "passing": n, "heads": _labels(top), "copy": [f"{c:.0%}" for c in top.copy_score],
    })


def negative_name_movers(
    dla: pd.DataFrame, scores: pd.DataFrame, rules: classes.ClassRules, logit_diff: float, min_share: float,
    paper_copy: float,
) -> Finding:
    """Heads whose DLA (upper 95% limit) is at most -`min_share` of the logit difference; reproduced
    if one of them is a negative name mover with a negative copy score at the paper's level."""
    if logit_diff <= 0:
        return NO_PREFERENCE
    shares = dla.assign(share=dla["mean"] / logit_diff, low=dla.ci_low / logit_diff, high=dla.ci_high / logit_diff)
    shares = shares.merge(scores, on=["layer", "head"]).sort_values("share")
    strongest = shares.iloc[0]
    strong = shares[shares.high <= -min_share]
    at_paper_strength = (_members(strong, "negative name mover", rules) & (strong.negative_copy_score >= paper_copy)
                         if len(strong) else pd.Series(dtype=bool))
    facts = {"heads": _labels(strong), "movers": _labels(strong[at_paper_strength.to_numpy()]) if len(strong) else [],
             "strongest": _labels(shares.head(1))[0], "min_share": min_share,
             "copy": [f"{c:.0%}" for c in strong.negative_copy_score]}
    verdict = "not reproduced" if not len(strong) else "reproduced" if at_paper_strength.any() else "partly"
    return Finding(verdict, float(strongest.share), float(strongest.low), float(strongest.high), facts=facts)


# --- What feeds the name movers (§3.2, §3.3, App. A) ------------------------------------------


def s_inhibition(attention: pd.DataFrame | None, senders: list, has_movers: bool, min_fall: float, seed: int = 0) -> Finding:
    """With the S-inhibition heads patched from ABC along their path into the name movers'
    queries (`Study.name_mover_attention`), how much of the name movers' preference for IO over
    S2 (attention from END) is lost, as a share of its clean value, with a paired bootstrap CI."""
    if not has_movers:
        return NOT_MEASURED
    if attention is None or not senders:
        return Finding("not reproduced", case="none found")
    clean = attention.to_io_clean - attention.to_s2_clean
    patched = attention.to_io_patched - attention.to_s2_patched
    if clean.mean() <= 0:  # name movers pass their check by preferring IO; a mean can still fall below
        return Finding("not reproduced", case="no preference to lose")
    value, low, high = _fall(patched, clean, seed)
    means = attention.mean()
    return Finding(_beyond(low, min_fall), value, low, high, facts={
        "heads": list(senders),
        "io_before": f"{means.to_io_clean:.2f}", "io_after": f"{means.to_io_patched:.2f}",
        "s2_before": f"{means.to_s2_clean:.2f}", "s2_after": f"{means.to_s2_patched:.2f}",
    })


def _strong_senders(paths: pd.DataFrame, share: float) -> pd.DataFrame:
    """Senders whose path carries at least `share` of the logit difference (patching a path that
    carries the task from ABC lowers the logit difference), strongest first."""
    carried = paths.assign(carried=-paths.relative_change)
    return carried[carried.carried >= share].sort_values("carried", ascending=False)


def _senders_finding(paths, scores, rules, share, kinds: tuple[str, ...], need_all_kinds: bool) -> Finding:
    """How many strong senders of a path sweep are members of one of `kinds`."""
    if paths is None:
        return NOT_MEASURED
    senders = _strong_senders(paths, share).merge(scores, on=["layer", "head"])
    if not len(senders):
        return Finding("not reproduced", 0.0, facts={"k": 0, "share": share}, case="none found")
    member = {kind: _members(senders, kind, rules) for kind in kinds}
    passing = np.logical_or.reduce([m.to_numpy() for m in member.values()])
    n, k = int(passing.sum()), len(senders)
    every_kind = all(m.any() for m in member.values()) or not need_all_kinds
    verdict = "reproduced" if n > k / 2 and every_kind else "partly" if n else "not reproduced"
    counts = [f"{int(m.sum())} {kind}" for kind, m in member.items()]
    shown = _labels(senders.head(6)) + ([f"{k - 6} more"] if k > 6 else [])
    return Finding(verdict, n / k, facts={"k": k, "passing": n, "heads": shown,
                                          "kinds": ", ".join(counts), "share": share})


def induction_duplicate(paths: pd.DataFrame | None, scores: pd.DataFrame, rules: classes.ClassRules, share: float) -> Finding:
    """Senders into the S-inhibition heads' values at S2 (`Study.path_patching_to_s_inhibition`)
    carrying >= `share`: reproduced if most are induction or duplicate-token heads on repeated
    random tokens and both kinds occur; None `paths`: no S-inhibition heads."""
    return _senders_finding(paths, scores, rules, share, ("induction", "duplicate token"), need_all_kinds=True)


def previous_token(paths: pd.DataFrame | None, scores: pd.DataFrame, rules: classes.ClassRules, share: float) -> Finding:
    """Senders into the induction heads' keys at S1+1 (`Study.path_patching_to_induction`)
    carrying >= `share`: reproduced if most are previous-token heads on repeated random tokens."""
    return _senders_finding(paths, scores, rules, share, ("previous token",), need_all_kinds=False)


def position_token(
    frame: pd.DataFrame | None, logit_diff: float, min_position: float, min_token: float, seed: int = 0,
) -> Finding:
    """logit difference ~ a * position + b * token, per prompt (`Study.position_token`):
    reproduced if a - b is above 0, a >= `min_position` and b >= `min_token` of the logit
    difference (lower 95% limits: the paper's position signal larger than its token signal, each
    at half the paper's size); partly if a or b is above 0 (with its own sentence where both are
    strong but position does not clearly outweigh token)."""
    if frame is None:
        return NOT_MEASURED
    if logit_diff <= 0:
        return NO_PREFERENCE
    a, b = frame.a.to_numpy(), frame.b.to_numpy()
    (a_low, a_high), b_low, diff_low = bootstrap_ci(a, seed), bootstrap_ci(b, seed)[0], bootstrap_ci(a - b, seed)[0]
    both_strong = a_low >= min_position * logit_diff and b_low >= min_token * logit_diff
    verdict = ("reproduced" if both_strong and diff_low > 0 else "partly" if a_low > 0 or b_low > 0
               else "not reproduced")
    return Finding(verdict, float(a.mean()), a_low, a_high, unit="logit",
                   facts={"a": _logits(a.mean()), "b": _logits(b.mean())},
                   case="token over position" if both_strong and diff_low <= 0 else None)


# --- Backup, the residual route, the criteria (§3.4, §4) ---------------------------------------


def backup(
    per_prompt: pd.DataFrame | None, rises: pd.DataFrame | None, scores: pd.DataFrame, rules: classes.ClassRules,
    logit_diff: float, min_recovered: float, min_rise: float, seed: int = 0,
) -> Finding:
    """After mean-ablating the name movers (`knockouts.backup_per_prompt` and `head_rises`): the
    share of their lost direct effect the other heads recover (paired bootstrap CI); the heads
    whose direct effect rises by >= `min_rise` of the logit difference are named, and those among
    them that pass as name movers are backup name movers."""
    if per_prompt is None:
        return NOT_MEASURED
    if logit_diff <= 0:
        return NO_PREFERENCE
    if per_prompt.lost.mean() <= 0:
        return Finding("not measured", facts={"heads": list(per_prompt.attrs.get("heads", []))}, case="no loss")
    value = float(per_prompt.recovered_by_heads.mean() / per_prompt.lost.mean())
    low, high = criteria.ratio_ci(per_prompt.recovered_by_heads, per_prompt.lost, seed)
    risers = rises[(rises.rise >= min_rise * logit_diff) & (rises.rise_ci_low > 0)].merge(scores, on=["layer", "head"])
    backup_movers = risers[_members(risers, "name mover", rules).to_numpy()] if len(risers) else risers
    cost = 1 - per_prompt.logit_diff_after.mean() / per_prompt.logit_diff_before.mean()
    verdict = "reproduced" if low >= min_recovered and len(backup_movers) else "partly" if low > 0 else "not reproduced"
    return Finding(verdict, value, low, high, facts={
        "heads": list(per_prompt.attrs.get("heads", [])), "backup": _labels(risers.head(4)),
        "backup_movers": _labels(backup_movers), "cost": float(cost),
    })


def residual_flow(residual: pd.DataFrame, n_layers: int, depth: float, tolerance: float, min_signal: float) -> Finding:
    """From `Study.residual_patching` (layer, position, patched_metric): the handover is the
    first layer from which END restores the most of all positions at every later layer. Which
    position leads is decided by the largest value, so a negative column cannot trigger it."""
    if residual is None or not len(residual):
        return NOT_MEASURED
    wide = _by_layer(residual)
    handover = _handover(wide)
    if handover is None:  # END never leads to the end: no handover at all
        return Finding("not reproduced", float("nan"), unit="depth", facts={"layer": "none", "carrier": "no position"})
    before = wide.loc[wide.index < handover]
    leader = before.idxmax(axis=1)
    s2_leads = (leader == "S2") & (before.max(axis=1) >= min_signal)
    handover_depth = float(_relative_depth(handover, n_layers))
    verdict = _grade(abs(handover_depth - depth) <= tolerance, len(before) > 0 and s2_leads.mean() > 0.5)
    carrier = leader.mode().iloc[0] if len(before) else "no position"
    return Finding(verdict, handover_depth, unit="depth", facts={"layer": handover, "carrier": carrier})


def _by_layer(residual: pd.DataFrame) -> pd.DataFrame:
    """Restored share by layer (rows) and position (columns)."""
    return residual.pivot(index="layer", columns="position", values="patched_metric").sort_index()


def handover_layer(residual: pd.DataFrame) -> int | None:
    """The first layer from which END restores the most of all positions at every later layer
    (`residual`: layer, position, patched_metric); None if END does not lead at the last layer."""
    return _handover(_by_layer(residual))


def _handover(wide: pd.DataFrame) -> int | None:
    not_end = np.flatnonzero((wide.idxmax(axis=1) != "END").to_numpy())
    if not len(not_end):
        return int(wide.index[0])
    return int(wide.index[not_end[-1] + 1]) if not_end[-1] + 1 < len(wide) else None


def faithfulness(n_circuit_heads: int, faith: dict, max_gap: float, max_gap_ci: float, partly_gap: float) -> Finding:
    """F(C)/F(M) (`Study.faithfulness`), judged by its distance from 1 (the paper's |F(M) - F(C)|:
    overshooting the model is as unfaithful as falling short) on the point and on its 95% interval."""
    if not n_circuit_heads:
        return NOT_MEASURED
    f, low, high = faith["faithfulness"], faith["faithfulness_ci_low"], faith["faithfulness_ci_high"]
    close = abs(1 - f) <= max_gap and 1 - max_gap_ci <= low and high <= 1 + max_gap_ci
    verdict = "reproduced" if close else "partly" if abs(1 - f) <= partly_gap else "not reproduced"
    return Finding(verdict, f, low, high, facts={"k": n_circuit_heads})


def completeness(table: pd.DataFrame | None, max_incompleteness: float, paper_greedy: float) -> Finding:
    """`Study.completeness`: the largest incompleteness over class-wise and random K, and the
    greedy search's, each as a share of F(M)."""
    if table is None or not len(table):
        return NOT_MEASURED
    f_m = float(table.set_index("subset").F_M_minus_K["empty"])
    tested = table.subset.str.startswith(("class:", "random"))
    worst = float(table.incompleteness[tested].max() / f_m) if tested.any() else 0.0
    if not (table.subset == "greedy").any():
        return Finding("not measured", worst, case="no greedy")
    greedy = float(table.incompleteness[table.subset == "greedy"].max() / f_m)
    return Finding(_grade(worst <= max_incompleteness, greedy <= paper_greedy), worst, facts={"greedy": greedy})


def minimality(table: pd.DataFrame | None, min_change: float) -> Finding:
    """`Study.minimality`: the share of heads whose removal changes F by >= `min_change` of F(C)."""
    if table is None or not len(table):
        return NOT_MEASURED
    passing = int((table.relative_change >= min_change).sum())
    share = passing / len(table)
    verdict = "reproduced" if passing == len(table) else "partly" if share > 0.5 else "not reproduced"
    return Finding(verdict, share, facts={"k": len(table), "passing": passing, "min_change": min_change,
                                         "least": float(table.relative_change.min())})


def small_circuit(table: pd.DataFrame | None, n_heads: int, max_share: float, partly_share: float) -> Finding:
    """From `Study.smallest_circuit`: the fewest top-ranked heads that keep the target share
    of F(M), as a share of all heads."""
    if table is None or not len(table):
        return NOT_MEASURED
    k = int(table.in_circuit.sum())
    share = k / n_heads
    verdict = "reproduced" if share <= max_share else "partly" if share <= partly_share else "not reproduced"
    return Finding(verdict, share, facts={"k": k, "method": str(table.method.iloc[0])})


# --- Consequences: adversarial prompts and the MLPs (Fig. 8, App. J) -------------------------


def _logit_diff_fall(frame: pd.DataFrame | None, after: str, min_fall: float, seed: int, **facts) -> Finding:
    """The fall of the mean logit difference from `frame.logit_diff` to `frame[after]`, prompt by
    prompt, judged on its lower 95% limit; not judged where the model does not prefer IO."""
    if frame is None or not len(frame):
        return NOT_MEASURED
    if frame.logit_diff.mean() <= 0:
        return NO_PREFERENCE
    value, low, high = _fall(frame[after], frame.logit_diff, seed)
    return Finding(_beyond(low, min_fall), value, low, high, facts={
        "before": _logits(frame.logit_diff.mean()), "after": _logits(frame[after].mean()), **facts})


def adversarial(frame: pd.DataFrame | None, min_fall: float, seed: int = 0) -> Finding:
    """`Study.extra_io`: the fall of the mean logit difference with two more mentions of IO."""
    s_wins = float(1 - frame.io_beats_s_extra_io.mean()) if frame is not None and len(frame) else float("nan")
    return _logit_diff_fall(frame, "logit_diff_extra_io", min_fall, seed, s_wins=s_wins)


def mlp_knockout(frame: pd.DataFrame | None, min_fall: float, seed: int = 0) -> Finding:
    """`Study.mlp_knockout`: the fall of the mean logit difference with every MLP after the
    first mean-ablated."""
    return _logit_diff_fall(frame, "knocked_out", min_fall, seed)
