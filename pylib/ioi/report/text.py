"""Words and numbers for the chapters' prose: inline formatting (a number with a true minus
sign, a percentage, a CI, a list of heads), tables as Markdown, and the sentences generated from
a result (the follow-ups' phrases). Every function takes a value or a DataFrame and returns
`Md`, which Quarto inserts as Markdown, so a chapter never prints a Python repr.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ioi.report.tables import PATH_STEPS


class Md(str):
    """Text that Quarto inserts as Markdown: an inline `{python}` number without quotes."""

    def _repr_markdown_(self) -> str:
        return str(self)


def fmt(x, digits: int = 2) -> Md:
    """A number for prose: rounded, with a true minus sign; integers stay integers."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return Md(f"{x:,}")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return Md("n/a")
    return Md(f"{x:.{digits}f}".replace("-", "−"))


def pct(x, digits: int = 0) -> Md:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return Md("n/a")
    return Md(f"{100 * x:.{digits}f}%".replace("-", "−"))


def ci(low, high, digits: int = 2) -> Md:
    return Md(f"[{fmt(low, digits)}, {fmt(high, digits)}]")


def heads(hs) -> Md:
    """Heads as the paper writes them: 9.9, 9.6 and 10.0."""
    names = [f"{l}.{h}" for l, h in hs]
    if len(names) < 2:
        return Md("".join(names) or "none")
    return Md(", ".join(names[:-1]) + " and " + names[-1])


def head_values(frame: pd.DataFrame, column: str, digits: int = 2) -> Md:
    """Heads with a signed value each, for prose: 9.9 (+2.99), 10.7 (−1.90) and 9.6 (+1.38)."""
    items = [f"{l}.{h} ({'+' if v >= 0 else ''}{fmt(v, digits)})" for l, h, v in zip(frame.layer, frame["head"], frame[column])]
    if len(items) < 2:
        return Md("".join(items) or "none")
    return Md(", ".join(items[:-1]) + " and " + items[-1])


def class_sizes(circuit) -> Md:
    """How many heads each class of a circuit has: 3 name mover, 4 S-inhibition, ..."""
    sizes = [f"{len(hs)} {c}" for c, hs in circuit.classes.items() if hs]
    return Md(", ".join(sizes) or "no heads")


class MarkdownTable:
    """A DataFrame as a pipe table, so that Quarto numbers and captions it in every format."""

    def __init__(self, frame: pd.DataFrame, digits: int = 2):
        self.frame, self.digits = frame, digits

    def _cell(self, x) -> str:
        if isinstance(x, float):
            return "" if math.isnan(x) else str(fmt(x, self.digits))
        return str(x).replace("|", "\\|")

    def _repr_markdown_(self) -> str:
        header = "| " + " | ".join(map(str, self.frame.columns)) + " |"
        rule = "|" + "|".join("---" for _ in self.frame.columns) + "|"
        rows = ["| " + " | ".join(self._cell(x) for x in row) + " |" for row in self.frame.itertuples(index=False)]
        return "\n".join([header, rule, *rows])

    def __str__(self) -> str:
        return self._repr_markdown_()


def strongest_senders(paths: pd.DataFrame, k: int = 3) -> dict:
    """For each path-patching step, the k senders whose path carries most of the logit
    difference (largest drop when patched from ABC), as prose; 'not measured' for a step
    whose receiving class the circuit lacks."""
    out = {step: Md(f"not measured, as the circuit has no {cls} heads") for step, (_, cls, _, _) in PATH_STEPS.items()}
    for receiver, frame in paths.groupby("receiver", sort=False):
        top = frame.assign(carried=-frame.relative_change).nlargest(k, "carried")
        out[receiver] = head_values(top, "carried")
    return out


def _num(x, digits: int = 2, percent: bool = False) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return (f"{100 * x:.0f}%" if percent else f"{x:.{digits}f}").replace("-", "−")


def ci_text(mean, low, high, digits: int = 2, percent: bool = False):
    """'3.56 [3.40, 3.71]': a mean and its 95% interval."""
    return Md(f"{_num(mean, digits, percent)} [{_num(low, digits, percent)}, {_num(high, digits, percent)}]")


def listing(items, empty: str = "none"):
    """'a, b and c'."""
    items = [str(i) for i in items]
    if len(items) < 2:
        return Md("".join(items) or empty)
    return Md(", ".join(items[:-1]) + " and " + items[-1])


def per_model(frame: pd.DataFrame, describe, empty: str = "none ran") -> str:
    """'model: text' for each row of `frame`, joined; `describe(row)` gives the text."""
    return listing([f"{row.model}: {describe(row)}" for row in frame.itertuples()], empty)


def size_text(row) -> str:
    """One size's results in a phrase, for `per_model`."""
    return (
        f"logit difference {ci_text(row.logit_diff_mean, row.logit_diff_ci_low, row.logit_diff_ci_high)}, "
        f"{len(row.name_movers)} name movers at relative depth {_num(row.name_mover_depth)}, "
        f"{len(row.negative_name_movers)} negative name movers, "
        f"strongest path into the name movers' queries {_num(row.s_inhibition_to_nm_effect, percent=True)}, "
        f"a found circuit of {row.circuit_size} heads ({_num(row.circuit_share_of_heads, percent=True)} of all) "
        f"in {row.seconds:.0f} s"
    )


def template_range(sweep: pd.DataFrame, order: str):
    """'57% to 99%': the lowest and highest per-template faithfulness of one name order."""
    values = sweep[(sweep.level == "template") & (sweep.order == order)].faithfulness
    return Md(f"{_num(values.min(), percent=True)} to {_num(values.max(), percent=True)}")


def skip_reasons(sweep: pd.DataFrame):
    """Why sizes were skipped, each distinct reason once, without the model's name:
    'is not in the local Hugging Face cache and the hub cannot be reached'."""
    reasons = sweep[sweep.status == "skipped"].reason
    short = [re.sub(r"^\S+ (\([^)]*\) )?", "", r.split(". ")[0]).rstrip(".") for r in reasons]
    return listing(list(dict.fromkeys(short)), empty="no size was skipped")


def interval_verdict(low, high):
    return Md("excludes zero" if low > 0 or high < 0 else "includes zero")


def class_text(comparison: pd.DataFrame, model_label: str):
    """'3 name mover (depth 0.82), 4 S-inhibition (depth 0.66), ...' for one model of
    `class_comparison`."""
    frame = comparison[comparison.model == model_label].sort_values("mean_relative_depth")
    return listing([f"{r.heads} {r._1} (depth {_num(r.mean_relative_depth)})" for r in frame.itertuples()])


def best_heads(scores: pd.DataFrame, score: str):
    """The top heads for one score of `top_heads_by_score`: '5.5 (0.41, depth 0.45)'."""
    frame = scores[scores.score == score]
    return listing([f"{r.layer}.{r.head} ({_num(r.value)}, depth {_num(r.relative_depth)})" for r in frame.itertuples()])
