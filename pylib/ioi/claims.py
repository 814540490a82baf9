"""The paper's structural claims as predicates that can be tested on any model.

Wang et al. 2022 make two kinds of claim. Numeric ones (a logit difference of 3.56, head 9.9's
direct effect) only mean something on GPT-2 small; `ioi.report.scorecard` judges those. The
structural ones describe a mechanism: a few late heads write the answer, they attend to IO and
copy it, earlier heads inhibit S through their queries, and so on. Restated as predicates over
the study's tables, they can be tested on any model, and each gets a verdict: "reproduced",
"partly", "not reproduced" or "not measured".

Each predicate is a pure function of DataFrames (so a test can hand it made-up tables and see
every verdict) and of thresholds that `data/claims.json` fixes, with the rule in words and a
sentence per verdict. `claims(study)` gathers the tables from a `Study`, applies every predicate
and returns one row per claim; the chapters print the sentence that the verdict picked, so no
sentence can contradict the number beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Float

from ioi.analyses import logit_attribution
from ioi.cache import cached
from ioi.circuits import criteria
from ioi.dataset import DATA_DIR

CLAIMS_PATH = DATA_DIR / "claims.json"
VERDICTS = ("reproduced", "partly", "not reproduced", "not measured")
NAME_POSITIONS = ("IO", "S1", "S2")


@dataclass(frozen=True)
class Finding:
    """A predicate's verdict, the number it rests on (with its 95% CI where one exists) and the
    facts its sentence names (head lists, counts, shares)."""

    verdict: str
    value: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    unit: str = "share"  # how the value reads: "share" (of something, 0-1) or "depth" (0-1 of the layers)
    facts: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


NOT_MEASURED = Finding("not measured")


def _labels(frame: pd.DataFrame) -> list[str]:
    return [f"{int(l)}.{int(h)}" for l, h in zip(frame.layer, frame["head"])]


def _relative_depth(layer, n_layers: int):
    return np.asarray(layer, dtype=float) / max(n_layers - 1, 1)


def _grade(first, second) -> str:
    """Both conditions: reproduced; one: partly; neither: not reproduced."""
    first, second = bool(first), bool(second)
    return "reproduced" if first and second else "partly" if first or second else "not reproduced"


# --- The predicates: tables in, a Finding out ----------------------------------------------------


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
    return Finding(verdict, point, low, high,
                   facts={"k": k, "heads": _labels(top), "late": late})


def name_movers(dla: pd.DataFrame, scores: pd.DataFrame, k: int, min_copy: float) -> Finding:
    """Of the k heads with the largest positive mean DLA, the share that attend END->IO more than
    END->S2 and have copy score >= `min_copy` (`dla`: layer, head, mean; `scores`: head scores)."""
    top = dla[dla["mean"] > 0].nlargest(k, "mean").merge(scores, on=["layer", "head"])
    if not len(top):
        return NOT_MEASURED
    passes = (top.end_to_io > top.end_to_s) & (top.copy_score >= min_copy)
    n = int(passes.sum())
    verdict = "reproduced" if n == len(top) else "partly" if n else "not reproduced"
    return Finding(verdict, n / len(top), facts={
        "k": len(top), "passing": n, "heads": _labels(top), "copy": [f"{c:.0%}" for c in top.copy_score],
    })


def negative_name_movers(dla: pd.DataFrame, scores: pd.DataFrame, logit_diff: float, min_share: float, min_copy: float) -> Finding:
    """Heads whose mean DLA is at most -`min_share` of the logit difference; reproduced if one of
    them attends END->IO more than END->S2 with negative copy score >= `min_copy`."""
    shares = dla.assign(share=dla["mean"] / logit_diff).merge(scores, on=["layer", "head"])
    strongest = shares.nsmallest(1, "share")
    strong = shares[shares.share <= -min_share].sort_values("share")
    value = float(strongest.share.iloc[0]) if len(strongest) else float("nan")
    ci = (float(strongest.ci_low.iloc[0] / logit_diff), float(strongest.ci_high.iloc[0] / logit_diff)) if "ci_low" in strongest else (np.nan, np.nan)
    facts = {"heads": _labels(strong), "min_share": min_share}
    if not len(strong):
        return Finding("not reproduced", value, min(ci), max(ci), facts=facts)
    passes = (strong.end_to_io > strong.end_to_s) & (strong.negative_copy_score >= min_copy)
    return Finding("reproduced" if passes.any() else "partly", value, min(ci), max(ci), facts=facts)


def _senders(paths: pd.DataFrame, scores: pd.DataFrame, min_effect: float) -> pd.DataFrame:
    """Senders whose path moves the logit difference by at least `min_effect` of it (a path
    that carries the signal lowers it when patched from ABC), strongest first."""
    carried = paths.assign(carried=-paths.relative_change)
    return carried[carried.carried >= min_effect].sort_values("carried", ascending=False).merge(
        scores, on=["layer", "head"], how="left")


def _senders_finding(paths, scores, min_effect, passes) -> Finding:
    if paths is None or not len(paths):
        return NOT_MEASURED
    strongest = float((-paths.relative_change).max())
    senders = _senders(paths, scores, min_effect)
    facts = {"k": len(senders), "heads": _labels(senders.head(4)), "min_effect": min_effect}
    if not len(senders):
        return Finding("not reproduced", strongest, facts={**facts, "passing": 0})
    n = int(passes(senders).sum())
    verdict = "reproduced" if n > len(senders) / 2 else "partly" if n else "not reproduced"
    return Finding(verdict, strongest, facts={**facts, "passing": n})


def s_inhibition(paths_to_name_movers: pd.DataFrame | None, scores: pd.DataFrame, min_effect: float) -> Finding:
    """Senders into the name movers' queries at END (`Study.path_patching_to_name_movers`):
    reproduced if most of those carrying >= `min_effect` attend END->S2 more than END->IO."""
    return _senders_finding(paths_to_name_movers, scores, min_effect, lambda s: s.end_to_s > s.end_to_io)


def induction_duplicate(paths_to_s_inhibition: pd.DataFrame | None, scores: pd.DataFrame, min_effect: float, min_score: float) -> Finding:
    """Senders into the S-inhibition heads' values at S2: reproduced if most of those carrying
    >= `min_effect` are induction or duplicate-token heads (score >= `min_score`)."""
    return _senders_finding(paths_to_s_inhibition, scores, min_effect,
                            lambda s: (s.induction >= min_score) | (s.duplicate_token >= min_score))


def backup(knockout: pd.DataFrame | None, max_ratio: float, partly_ratio: float, seed: int = 0) -> Finding:
    """Knocking out the name movers costs F(M) - F(M \\ NM) per prompt; their summed direct
    effect is `nm_dla`. The ratio of the means, with a paired bootstrap CI (`knockout`: F_M,
    F_M_minus_NM, nm_dla per prompt, and the heads in `attrs["heads"]`)."""
    if knockout is None or not len(knockout) or knockout.nm_dla.mean() <= 0:
        return NOT_MEASURED
    cost = knockout.F_M - knockout.F_M_minus_NM
    ratio = float(cost.mean() / knockout.nm_dla.mean())
    low, high = criteria.ratio_ci(cost, knockout.nm_dla, seed) if len(knockout) > 1 else (ratio, ratio)
    verdict = "reproduced" if high <= max_ratio else "partly" if ratio <= partly_ratio else "not reproduced"
    return Finding(verdict, ratio, low, high, facts={"heads": list(knockout.attrs.get("heads", []))})


def residual_flow(residual: pd.DataFrame, n_layers: int, min_depth: float, max_depth: float, min_signal: float) -> Finding:
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
    names_lead = (before.idxmax(axis=1).isin(NAME_POSITIONS) & (before.max(axis=1) >= min_signal))
    carriers = before.idxmax(axis=1)[names_lead].value_counts()
    depth = float(_relative_depth(handover, n_layers))
    verdict = _grade(min_depth <= depth <= max_depth, len(before) > 0 and names_lead.mean() > 0.5)
    carrier = carriers.index[0] if len(carriers) else (before.idxmax(axis=1).mode().iloc[0] if len(before) else "no position")
    return Finding(verdict, depth, unit="depth", facts={"layer": handover, "carrier": carrier})


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


def small_circuit(
    n_circuit_heads: int, n_heads: int, faithfulness: dict, max_share: float, min_faithfulness: float,
    min_faithfulness_low: float,
) -> Finding:
    """The circuit's share of all heads, and its faithfulness F(C)/F(M), judged on the point
    and on the lower limit of its 95% CI (a wide interval keeps no promise)."""
    if not n_circuit_heads:
        return NOT_MEASURED
    share = n_circuit_heads / n_heads
    f = faithfulness["faithfulness"]
    faithful = f >= min_faithfulness and faithfulness["faithfulness_ci_low"] >= min_faithfulness_low
    return Finding(_grade(share <= max_share, faithful), f,
                   faithfulness["faithfulness_ci_low"], faithfulness["faithfulness_ci_high"],
                   facts={"k": n_circuit_heads, "share": share})


# --- From a Study to the claims table -------------------------------------------------------------


def per_prompt_head_dla(study) -> pd.DataFrame:
    """Every head's direct logit attribution on every clean prompt (cached)."""
    def compute():
        frame = logit_attribution.per_prompt_attributions(study.model, study.clean)
        return frame[frame.component == "head"][["prompt_index", "layer", "head", "dla"]].reset_index(drop=True)

    return cached("per_prompt_head_dla", compute, {"config": repr(study.config)}, study.model, (study.clean, study.corrupted))


def name_mover_knockout(study) -> pd.DataFrame | None:
    """Per prompt: F(M), F(M without the circuit's name movers, mean-ablated) and the name movers'
    summed direct effect; None when the circuit has no name movers."""
    movers = sorted(study.circuit().classes.get("name mover", ()))
    if not movers:
        return None

    def compute():
        whole = criteria.whole_model(study.model)
        ablation = criteria.mean_ablation(study.model, study.clean, study.corrupted)
        f = criteria.circuit_logit_diffs(study.model, [whole, whole.without(movers)], study.clean, ablation, base=whole)
        dla = per_prompt_head_dla(study)
        is_mover = pd.Series([(l, h) in set(movers) for l, h in zip(dla.layer, dla["head"])], index=dla.index)
        nm_dla = dla[is_mover].groupby("prompt_index").dla.sum().sort_index().to_numpy()
        return pd.DataFrame({"F_M": f[0].double().numpy(), "F_M_minus_NM": f[1].double().numpy(), "nm_dla": nm_dla})

    frame = cached("name_mover_knockout", compute, {"config": repr(study.config), "movers": movers},
                   study.model, (study.clean, study.corrupted))
    frame.attrs["heads"] = [f"{l}.{h}" for l, h in movers]
    return frame


def load_claims(path: Path = CLAIMS_PATH) -> list[dict]:
    return json.loads(Path(path).read_text())["claims"]


def _classes(study) -> dict:
    return study.circuit().classes


def findings(study, specs: list[dict] | None = None) -> dict[str, Finding]:
    """Every claim's Finding on the study's model."""
    specs = specs or load_claims()
    th = {c["id"]: c["thresholds"] for c in specs}
    n_layers, n_heads = study.model.cfg.n_layers, study.model.cfg.n_heads
    scores = study.head_scores()
    dla = study.head_attributions()
    logit_diff = float(study.baseline().logit_diff.mean())
    has = lambda cls: bool(_classes(study).get(cls))  # noqa: E731
    gather = {
        "behaviour": lambda t: behaviour(study.baseline_summary(), **t),
        "direct_writers": lambda t: direct_writers(per_prompt_head_dla(study), n_layers, **t),
        "name_movers": lambda t: name_movers(dla, scores, **t),
        "negative_name_movers": lambda t: negative_name_movers(dla, scores, logit_diff, **t),
        "s_inhibition": lambda t: s_inhibition(study.path_patching_to_name_movers() if has("name mover") else None, scores, **t),
        "induction_duplicate": lambda t: induction_duplicate(
            study.path_patching_to_s_inhibition() if has("S-inhibition") else None, scores, **t),
        "backup": lambda t: backup(name_mover_knockout(study), seed=study.config.seed, **t),
        "residual_flow": lambda t: residual_flow(study.residual_patching(), n_layers, **t),
        "small_circuit": lambda t: small_circuit(len(study.circuit().heads), n_layers * n_heads, study.faithfulness(), **t),
    }
    unknown = set(th) - set(gather)
    if unknown:
        raise ValueError(f"data/claims.json names claims with no predicate: {sorted(unknown)}")
    return {claim_id: gather[claim_id](th[claim_id]) for claim_id in th}


def claims(study, specs: list[dict] | None = None) -> pd.DataFrame:
    """One row per structural claim: the claim, the paper's finding, the rule (thresholds filled
    in), our value with its CI, the verdict, and the facts its sentence names."""
    specs = specs or load_claims()
    found = findings(study, specs)
    rows = []
    for spec in specs:
        f = found[spec["id"]]
        rows.append({
            "claim_id": spec["id"], "short": spec["short"], "claim": spec["claim"], "paper": spec["paper"],
            "rule": spec["rule"].format(**spec["thresholds"]),
            "value": f.value, "ci_low": f.ci_low, "ci_high": f.ci_high, "unit": f.unit,
            "verdict": f.verdict, "facts": {**spec["thresholds"], **f.facts}, "text": spec["text"][f.verdict],
        })
    return pd.DataFrame(rows)
