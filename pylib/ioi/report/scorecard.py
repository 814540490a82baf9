"""The scorecard: the paper's claims measured on the study's model and judged by their rules.

Two kinds of claim. The structural ones (`ioi.claims`, rules in `data/claims.json`) hold or fail on
any model; `claims_table` prints them and `claim_sentence` gives the sentence their verdict picked.
The numeric ones (`data/published_claims.csv`: each published number with the rule that decides
whether we reproduced it: published value inside our 95% CI, within 20%, same sign and top-k, ...)
were measured on GPT-2 small and are judged only there: `scorecard(study)` measures each, applies
its rule and returns one row per claim, and has no rows on any other model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ioi.dataset import DATA_DIR
from ioi.claims import handover_layer
from ioi.report.text import Count, MarkdownTable, Md, ci, fmt, listing, pct


CLAIMS_PATH = DATA_DIR / "published_claims.csv"


PAPER_MODEL = "gpt2-small"  # the model the published numbers were measured on


@dataclass(frozen=True)
class Measured:
    """A measured quantity: its value, its 95% CI where we have one, and for per-head measures
    its rank among all heads by absolute value (1 = largest)."""

    value: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    rank: int | None = None


def load_claims(path: Path = CLAIMS_PATH) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"caveat": str}).fillna({"caveat": ""})


def _summary_row(frame: pd.DataFrame, metric: str) -> Measured:
    row = frame.set_index("metric").loc[metric]
    return Measured(row["mean"], row.ci_low, row.ci_high)


def _head_measure(frame: pd.DataFrame, column: str, head: str) -> Measured:
    layer, h = (int(x) for x in head.split("."))
    ranked = frame.assign(size=frame[column].abs()).sort_values("size", ascending=False, ignore_index=True)
    at = ranked.index[(ranked.layer == layer) & (ranked["head"] == h)]
    if not len(at):
        return Measured(float("nan"))
    row = ranked.loc[at[0]]
    return Measured(row[column], row.get("ci_low", float("nan")), row.get("ci_high", float("nan")), int(at[0]) + 1)


def _handover(residual: pd.DataFrame) -> Measured:
    layer = handover_layer(residual)
    return Measured(float("nan") if layer is None else float(layer))


def _faithfulness(study) -> Measured:
    f = study.faithfulness()
    return Measured(f["faithfulness"], f["faithfulness_ci_low"], f["faithfulness_ci_high"])


def _faithfulness_median(study, order: str) -> Measured:
    table = study.faithfulness_by_template()
    values = table.faithfulness[table.order == order]
    return Measured(float(values.median()) if len(values) else float("nan"))


def _greedy(study) -> Measured:
    table = study.completeness()
    return Measured(float(table.incompleteness[table.subset == "greedy"].max()))


def _knockout_cost(study, cls: str) -> Measured:
    """Share of the whole model's F lost when one class is mean-ablated (completeness's F(M \\ K))."""
    table = study.completeness().set_index("subset")
    if f"class: {cls}" not in table.index:
        return Measured(float("nan"))
    return Measured(1 - table.F_M_minus_K[f"class: {cls}"] / table.F_M_minus_K["empty"])


MEASURES = {
    # measure name (the part before ":"): function(study, argument after ":") -> Measured
    "baseline.logit_diff": lambda s, _: _summary_row(s.baseline_summary(), "logit_diff"),
    "baseline.io_prob": lambda s, _: _summary_row(s.baseline_summary(), "io_prob"),
    "baseline.io_beats_s": lambda s, _: _summary_row(s.baseline_summary(), "io_beats_s"),
    "residual.end_overtakes_s2": lambda s, _: _handover(s.residual_patching()),
    "dla": lambda s, head: _head_measure(s.head_attributions(), "mean", head),
    "head_patching": lambda s, head: _head_measure(s.head_patching(), "patched_metric", head),
    "circuit.faithfulness": lambda s, _: _faithfulness(s),
    "circuit.faithfulness_median": _faithfulness_median,
    "circuit.minimality_min": lambda s, _: Measured(float(s.minimality().relative_change.min())),
    "circuit.greedy_incompleteness": lambda s, _: _greedy(s),
    "circuit.knockout_cost": _knockout_cost,
}


def measure(study, name: str) -> Measured:
    key, _, arg = name.partition(":")
    return MEASURES[key](study, arg)


def verdict(rule: str, published: float, measured: Measured, low: float = float("nan"), high: float = float("nan")) -> str:
    """'reproduced' or 'not reproduced' by the claim's rule; 'not measured' without a value."""
    if measured.value is None or math.isnan(measured.value):
        return "not measured"
    kind, _, arg = rule.partition(":")
    v = measured.value
    checks = {
        "in_ci": lambda: measured.ci_low <= published <= measured.ci_high,
        "within_rel": lambda: abs(v - published) <= float(arg) * abs(published),
        "within_abs": lambda: abs(v - published) <= float(arg),
        "same_sign_top": lambda: np.sign(v) == np.sign(published) and measured.rank is not None and measured.rank <= int(arg),
        "at_least": lambda: v >= published,
        "in_range": lambda: low <= v <= high,
    }
    return "reproduced" if checks[kind]() else "not reproduced"


RULE_TEXT = {
    "in_ci": "published value in our 95% CI",
    "within_rel": "within {:.0%} of the published value",
    "within_abs": "within ±{} of the published value",
    "same_sign_top": "same sign, and among our top {} heads by |value|",
    "at_least": "at least the published value",
    "in_range": "inside the published range",
}


def rule_text(rule: str) -> str:
    kind, _, arg = rule.partition(":")
    text = RULE_TEXT[kind]
    return text.format(float(arg) if kind == "within_rel" else arg) if arg else text


def _value_text(x) -> str:
    """A table cell: whole numbers such as a layer index without decimals."""
    if pd.isna(x):
        return "n/a"
    return str(fmt(int(x))) if float(x).is_integer() and abs(x) >= 2 else str(fmt(x))


def published_text(claim) -> str:
    if not pd.isna(claim.published_low):
        return f"{fmt(claim.published_low)}–{fmt(claim.published_high)}"
    return _value_text(claim.published_value)


SCORE_COLUMNS = ["claim_id", "claim", "published", "measured", "ci_low", "ci_high", "rank", "rule", "verdict", "source", "caveat"]


def score(claims: pd.DataFrame, measured: dict) -> pd.DataFrame:
    """One row per claim: published, measured with CI, rule and verdict. `measured` maps the
    measure name to a `Measured`."""
    rows = []
    for claim in claims.itertuples(index=False):
        m = measured[claim.measure]
        rule_verdict = verdict(claim.rule, claim.published_value, m, claim.published_low, claim.published_high)
        rows.append({
            "claim_id": claim.claim_id, "claim": claim.claim, "published": published_text(claim),
            "measured": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "rank": m.rank,
            "rule": rule_text(claim.rule),
            "verdict": rule_verdict,
            "source": claim.source, "caveat": claim.caveat,
        })
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def scorecard(study, claims: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every published number, measured and judged on GPT-2 small; no rows on another model,
    where GPT-2's numbers are no target (its structural claims are, in `ioi.claims`)."""
    claims = load_claims() if claims is None else claims
    if study.config.model != PAPER_MODEL:
        claims = claims.iloc[:0]
    return score(claims, {name: measure(study, name) for name in claims.measure.unique()})


def tally(card: pd.DataFrame) -> Md:
    """The verdicts counted, for prose: '9 of 17 claims reproduced, 6 did not, ...'."""
    counts = card.verdict.value_counts()
    parts = [f"{counts[v]} {text}" for v, text in (("reproduced", "reproduced"), ("partly", "partly"),
             ("not reproduced", "did not"), ("not measured", "could not be measured")) if v in counts]
    if not parts:
        return Md("no claims")
    parts[0] = parts[0].replace(" ", f" of {len(card)} claims ", 1)
    return Md(", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1])


def published_range(claims: pd.DataFrame, claim_id: str) -> Md:
    """A published range as a percentage span: 57–99%."""
    row = claims.loc[claim_id]
    return Md(f"{100 * row.published_low:.0f}–{pct(row.published_high)}")


def scorecard_table(card: pd.DataFrame) -> MarkdownTable:
    """The scorecard as the report prints it."""
    ours = [_value_text(v) + (f" (rank {r})" if r is not None and not pd.isna(r) else "")
            for v, r in zip(card.measured, card["rank"])]
    ci_text = [str(ci(lo, hi)) if not (pd.isna(lo) or pd.isna(hi)) else "" for lo, hi in zip(card.ci_low, card.ci_high)]
    shown = pd.DataFrame({
        "Claim": card.claim, "Published": card.published, "Ours": ours, "95% CI": ci_text,
        "Rule": card.rule, "Verdict": card.verdict,
    })
    return MarkdownTable(shown)


# --- Structural claims (`ioi.claims`) -------------------------------------------------------------


def _fact_text(value) -> str | Count:
    """A fact for a claim's sentence: head lists joined, shares as percentages."""
    if isinstance(value, (list, tuple)):
        return str(listing(value))
    if isinstance(value, (float, np.floating)):
        return str(pct(value))
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return Count(value)
    return str(value)


def claim_value(row) -> str:
    """A claim's number as a table cell: a share as a percentage, a depth or a logit difference
    as a number."""
    if pd.isna(row.value):
        return "n/a"
    return str(fmt(row.value)) if row.unit in ("depth", "logit") else str(pct(row.value))


def claim_interval(row) -> str:
    """A claim's 95% interval as text, in its value's unit ('n/a' where it has none)."""
    if pd.isna(row.ci_low) or pd.isna(row.ci_high):
        return "n/a"
    return str(ci(row.ci_low, row.ci_high, 2)) if row.unit in ("depth", "logit") else _pct_ci(row)


def claim_sentence(row) -> Md:
    """The sentence the claim's verdict picked, with its facts filled in ({value}, {ci}, and
    counts that agree with their noun: {k:head})."""
    facts = {k: _fact_text(v) for k, v in row.facts.items()}
    return Md(row.text.format(value=claim_value(row), ci=claim_interval(row), **facts))


def claim_sentences(frame: pd.DataFrame) -> dict[str, Md]:
    """claim_id -> the sentence its verdict picked, for inline use in the chapters."""
    return {row.claim_id: claim_sentence(row) for row in frame.itertuples(index=False)}


def by_verdict(frame: pd.DataFrame) -> dict[str, Md]:
    """verdict -> the claims that got it, for prose ('name movers and S-inhibition'), 'none' if none."""
    from ioi.claims import VERDICTS

    return {v: listing(list(frame.short[frame.verdict == v]), empty="none") for v in VERDICTS}


def claim_cell(row) -> str:
    """A claim's value with its interval, for a table: '87% [83%, 91%]'."""
    interval = claim_interval(row)
    return claim_value(row) + ("" if interval == "n/a" else f" {interval}")


def claims_columns(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """One model's two columns of the central table: its value [95% CI] and its verdict."""
    return pd.DataFrame({f"{name} [95% CI]": [claim_cell(r) for r in frame.itertuples(index=False)],
                         f"{name} verdict": list(frame.verdict)})


def numeric_rows(card: pd.DataFrame) -> pd.DataFrame:
    """GPT-2 small's published numbers (`scorecard`): the claim with its published value, and
    our value (with its rank among heads and its CI) and verdict."""
    ours = [_value_text(v) + (f" (rank {int(r)})" if r is not None and not pd.isna(r) else "")
            + (f" {ci(lo, hi)}" if not (pd.isna(lo) or pd.isna(hi)) else "")
            for v, r, lo, hi in zip(card.measured, card["rank"], card.ci_low, card.ci_high)]
    return pd.DataFrame({"Claim": [f"{c} (published: {p})" for c, p in zip(card.claim, card.published)],
                         "value": ours, "verdict": list(card.verdict)})


def claims_table(frames: dict[str, pd.DataFrame], card: pd.DataFrame | None = None) -> MarkdownTable:
    """The report's central table: one row per claim (`ioi.claims`), and for each model (name ->
    its claims frame, in column order) its value with its 95% CI and its verdict; on GPT-2 small,
    its published numbers below, judged by their own rules (`scorecard`)."""
    first = next(iter(frames.values()))
    table = pd.concat([pd.DataFrame({"Claim": list(first.claim)})]
                      + [claims_columns(name, frame) for name, frame in frames.items()], axis=1)
    if card is not None and len(card):
        numeric = numeric_rows(card)
        name = next(iter(frames))
        table = pd.concat([table, numeric.rename(columns={"value": f"{name} [95% CI]", "verdict": f"{name} verdict"})],
                          ignore_index=True)
    return MarkdownTable(table.fillna(""))


def rules_table(frame: pd.DataFrame) -> MarkdownTable:
    """Each claim's finding on GPT-2 small as the paper states it, and the rule that judges ours."""
    return MarkdownTable(pd.DataFrame({"Claim": frame.short, "GPT-2 small (the paper)": frame.paper, "Rule": frame.rule}))


HISTORY_PATH = DATA_DIR / "claims_history.csv"


def load_history(path: Path = HISTORY_PATH) -> pd.DataFrame:
    """When each rule was set or changed, why, and which numbers had been seen (as git shows it)."""
    return pd.read_csv(path)


def history_table(history: pd.DataFrame) -> MarkdownTable:
    return MarkdownTable(history.rename(columns=str.capitalize))


def rules_fixed(history: pd.DataFrame) -> Md:
    """For prose: when the rules were first set and last changed, from the history."""
    first, last = history.date.iloc[0][:10], history.date.iloc[-1][:10]
    return Md(f"first set on {first}" + ("" if first == last else f" and last changed on {last}"))


def _pct_ci(row) -> str:
    return f"[{pct(row.ci_low)}, {pct(row.ci_high)}]"
