"""Words and numbers for the chapters' prose: inline formatting (a number with a true minus
sign, a percentage, a CI, a list of heads), tables as Markdown, and the sentences generated from
a result (the follow-ups' phrases). Every function takes a value or a DataFrame and returns
`Md`, which Quarto inserts as Markdown, so a chapter never prints a Python repr.
"""

from __future__ import annotations

import itertools
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
    text = f"{x:.{digits}f}"
    if float(text) == 0:  # no −0.00
        text = f"{0:.{digits}f}"
    return Md(text.replace("-", "−"))


def pct(x, digits: int = 0) -> Md:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return Md("n/a")
    text = f"{100 * x:.{digits}f}"
    if float(text) == 0:  # no −0%
        text = f"{0:.{digits}f}"
    return Md(text.replace("-", "−") + "%")


def ci(low, high, digits: int = 2, percent: bool = False) -> Md:
    """'[3.40, 3.71]', or with `percent` '[66%, 77%]'."""
    if percent:
        return Md(f"[{pct(low)}, {pct(high)}]")
    return Md(f"[{fmt(low, digits)}, {fmt(high, digits)}]")


class Count(int):
    """A count that agrees with its noun in number, for sentences written as format strings:
    f"{Count(1):name mover}" is "1 name mover", f"{Count(3):head}" is "3 heads" (`count`);
    with no noun, a plain number."""

    def __format__(self, noun: str) -> str:
        if not noun or not noun[-1].isalpha():
            return format(int(self), noun)
        return str(count(int(self), noun))


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


def count(n, noun: str, plural: str | None = None) -> Md:
    """A count with its noun in agreeing number: '1 name mover', '2 name movers', '0 heads'.
    The last word of `noun` takes an s (es after s, x, ch, sh; ies for a consonant and y)
    unless `plural` is given."""
    n = int(n)
    if n == 1:
        return Md(f"{fmt(n)} {noun}")
    if plural is None:
        stem, _, last = noun.rpartition(" ")
        if last.endswith(("s", "x", "ch", "sh")):
            last += "es"
        elif last.endswith("y") and last[-2:-1] not in tuple("aeiou"):
            last = last[:-1] + "ies"
        else:
            last += "s"
        plural = f"{stem} {last}" if stem else last
    return Md(f"{fmt(n)} {plural}")


# A head of each class, as a noun ("2 induction heads", "1 name mover"); other classes: "<class> head".
CLASS_NOUNS = {"S-inhibition": "S-inhibition head", "induction": "induction head",
               "duplicate token": "duplicate-token head", "previous token": "previous-token head"}


def class_count(n, cls: str) -> Md:
    """'2 induction heads', '1 name mover': a count of one class's heads."""
    noun = cls if cls.endswith("mover") else CLASS_NOUNS.get(cls, f"{cls} head")
    return count(n, noun)


def class_sizes(circuit) -> Md:
    """How many heads each class of a circuit has: '3 name movers, 4 S-inhibition heads and 1
    previous-token head'."""
    return listing([class_count(len(hs), c) for c, hs in circuit.classes.items() if hs], empty="no heads")


class MarkdownTable:
    """A DataFrame as a pipe table, so that Quarto numbers and captions it in every format.

    Column widths: pandoc sizes a pipe table's columns by the dashes of its rule line once any
    line is longer than 72 characters, each column taking its share of the text width (`LINE`
    dashes, about `CHARS` characters of table text). A column of short cells (none over `SHORT`
    characters: a number with its interval, a verdict) gets dashes for its longest cell, so that
    none of them wraps or spills into its neighbour; the columns of sentences share the rest in
    the split (in steps of a twentieth) that prints the table in the fewest lines."""

    SHORT, LINE, CHARS = 22, 140, 120

    def __init__(self, frame: pd.DataFrame, digits: int = 2):
        self.frame, self.digits = frame, digits

    def _cell(self, x) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return ""
        if isinstance(x, (float, np.floating, np.integer)):
            return str(fmt(x.item() if isinstance(x, np.generic) else x, self.digits))
        return str(x).replace("|", "\\|")

    def _widths(self, cells: list[list[str]]) -> list[int]:
        columns = list(zip(*cells)) if cells else [()] * len(self.frame.columns)
        lengths = [[len(str(name))] + [len(c) for c in col] for name, col in zip(self.frame.columns, columns)]
        short = [max(ls) <= self.SHORT for ls in lengths]
        widths = [max(ls) + 6 for ls in lengths]  # 6: the cell's padding, in characters
        long = [i for i, s in enumerate(short) if not s]
        rest = max(self.LINE - sum(widths[i] for i, s in enumerate(short) if s), self.LINE // 2)
        for i, share in zip(long, self._fewest_lines([lengths[i] for i in long], rest)):
            widths[i] = max(6, share)
        return widths

    def _fewest_lines(self, lengths: list[list[int]], dashes: int) -> list[int]:
        """Dashes for each sentence column, summing to `dashes`, that minimise the table's lines
        (each row as tall as its tallest cell); an even split for more than three columns."""
        if not lengths:
            return []
        steps = 20
        splits = [s for s in itertools.product(range(1, steps), repeat=len(lengths) - 1) if sum(s) < steps]
        if len(lengths) > 3 or not splits:
            return [dashes // len(lengths)] * len(lengths)
        rows = np.array(lengths).T  # [row, column], the header first

        def lines(split) -> float:
            chars = np.array([*split, steps - sum(split)]) / steps * dashes * self.CHARS / self.LINE
            return np.ceil(rows / chars).max(1).sum()

        best = min(splits, key=lines)
        return [int(dashes * part / steps) for part in (*best, steps - sum(best))]

    def _repr_markdown_(self) -> str:
        cells = [[self._cell(x) for x in row] for row in self.frame.itertuples(index=False)]
        header = "| " + " | ".join(map(str, self.frame.columns)) + " |"
        numeric = [all(_is_number(c) for c in col if c) for col in zip(*cells)] if cells else [False] * len(self.frame.columns)
        rule = "|" + "|".join(("-" * (w - 1) + ":") if num else (":" + "-" * (w - 1)) for w, num in zip(self._widths(cells), numeric)) + "|"
        rows = ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join([header, rule, *rows])

    def __str__(self) -> str:
        return self._repr_markdown_()


def _is_number(cell: str) -> bool:
    """A cell that reads as a number (numbers align right, text left)."""
    return re.fullmatch(r"[−+-]?[\d,]*\.?\d+%?", cell.strip()) is not None


def inline_numbers() -> None:
    """In a Quarto render, print a bare numpy number in prose as `fmt` would (142, 0.87), not as
    its repr (np.int64(142)): a safety net under the chapters' own formatting."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    plain = shell.display_formatter.formatters["text/plain"]
    plain.for_type(np.generic, lambda x, printer, cycle: printer.text(str(fmt(x.item()))))


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
    """`pct` or `fmt` with a fixed number of decimals (an integer prints as 3.00 here)."""
    if x is None:
        return "n/a"
    return str(pct(x) if percent else fmt(float(x), digits))


def ci_text(mean, low, high, digits: int = 2, percent: bool = False):
    """'3.56 [3.40, 3.71]': a mean and its 95% interval."""
    return Md(f"{_num(mean, digits, percent)} [{_num(low, digits, percent)}, {_num(high, digits, percent)}]")


def listing(items, empty: str = "none"):
    """'a, b and c'."""
    items = [str(i) for i in items]
    if len(items) < 2:
        return Md("".join(items) or empty)
    return Md(", ".join(items[:-1]) + " and " + items[-1])


MEASURE_NAMES = {"logit_diff": "the logit difference", "behaviour": "the share of prompts IO wins", "direct_writers": "the top heads' direct-effect share",
                 "name_movers": "the top writers that are name movers", "negative_name_movers": "the strongest negative writer",
                 "backup": "the repair by other heads", "small_circuit": "the smallest faithful circuit"}


def _measure_value(row) -> str:
    value = fmt(row.value) if row.unit == "logit" else pct(row.value)
    if pd.isna(row.ci_low):
        return str(value)
    interval = ci(row.ci_low, row.ci_high) if row.unit == "logit" else f"[{pct(row.ci_low)}, {pct(row.ci_high)}]"
    return f"{value} {interval}"


def size_trend_text(trend: pd.DataFrame, sweep: pd.DataFrame) -> Md:
    """The size follow-up's finding, one phrase per measure, from `followups.size_trend`: what
    each measure is at the smallest and the largest size, and whether it changes beyond its
    intervals (or, without intervals, whether its verdict changes)."""
    if not len(trend):
        return Md("with fewer than two sizes of one family measured, no trend can be read")
    at = sweep.set_index(["model", "measure"])
    phrases = []
    for r in trend.itertuples():
        small, large = at.loc[(r.small, r.measure)], at.loc[(r.large, r.measure)]
        values = f"{_measure_value(small)} → {_measure_value(large)}"
        if r.change in ("same verdict", "verdict changes"):
            verdicts = small.verdict if r.change == "same verdict" else f"{small.verdict} → {large.verdict}"
            phrases.append(f"{MEASURE_NAMES.get(r.measure, r.measure)} {values} ({r.change}: {verdicts})")
        else:
            phrases.append(f"{MEASURE_NAMES.get(r.measure, r.measure)} {r.change} ({values})")
    return listing(phrases)


def verdicts_by_size(sweep: pd.DataFrame, model: str) -> Md:
    """'name movers partly, backup name movers not reproduced, ...' for one model of the sweep."""
    rows = sweep[(sweep.model == model) & (sweep.measure != "logit_diff")]
    return listing([f"{MEASURE_NAMES.get(r.measure, r.measure)} {r.verdict}" for r in rows.itertuples()])


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
    """'3 name movers (depth 0.82), 4 S-inhibition heads (depth 0.66), ...' for one model of
    `class_comparison`."""
    frame = comparison[comparison.model == model_label].sort_values("mean_relative_depth")
    return listing([f"{class_count(n, c)} (depth {_num(d)})"
                    for n, c, d in zip(frame.heads, frame["class"], frame.mean_relative_depth)])


def best_heads(scores: pd.DataFrame, score: str):
    """The top heads for one score of `top_heads_by_score`: '5.5 (0.41, depth 0.45)'."""
    frame = scores[scores.score == score]
    return listing([f"{r.layer}.{r.head} ({_num(r.value)}, depth {_num(r.relative_depth)})" for r in frame.itertuples()])


# --- Sections that cannot run on a profile's model -------------------------------------------------
# A follow-up whose models cannot be loaded here prints one sentence instead of its body: a cell
# with `output: asis` prints `skip_start(note)` (the sentence, then the opening of a hidden
# block) before the body and `skip_end(note)` after it; with `note` None both print nothing.


def skip_start(note: str | None) -> Md:
    return Md("" if note is None else f"{note}\n\n::: {{.content-hidden}}\n")


def skip_end(note: str | None) -> Md:
    return Md("" if note is None else "\n:::\n")


def sizes_unavailable(sweep: pd.DataFrame) -> Md | None:
    """One sentence when no size of the sweep could run here, else None."""
    if (sweep.status == "ok").any():
        return None
    return Md(f"This follow-up, which asks whether the circuit changes with model size, did not run: no size asked for "
              f"({listing(sweep.model)}) could be loaded here, as each {skip_reasons(sweep)}.")


# What the report says about the models a follow-up compares: (name, parameters in millions,
# training, weights as loaded). Keyed by `ioi.models` name; a local directory has no entry.
MODEL_FACTS = {
    "gpt2-small": ("GPT-2 small", 124, "base", "full precision"),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct", 494, "code instruction-tuned", "5-bit Q5_0, output head 8-bit"),
    "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct", 1544, "code instruction-tuned", "4-bit Q4_K_M"),
    "smollm2-135m": ("SmolLM2-135M-Instruct", 135, "instruction-tuned", "4-bit Q4_1"),
    "gemma3-270m": ("Gemma 3 270M", 270, "base", "4-bit Q4_K_M"),
}


def extension_unavailable(extension: str, main: str, error: Exception | None = None) -> Md | None:
    """One sentence when the second-family follow-up cannot run, else None: no model named, the
    main study's own model named (a follow-up never repeats it), or one that cannot be loaded."""
    if not extension:
        return Md("This follow-up, which asks whether another model family solves the task the same way, did not run: "
                  "no second model is named for this profile (IOI_EXTENSION_MODEL).")
    if extension == main:
        return Md(f"This follow-up, which asks whether another model family solves the task the same way, did not run: "
                  f"the model named for it, {extension}, is the main study's own.")
    from ioi.engines.check import UnsupportedModelError

    if isinstance(error, UnsupportedModelError):
        return Md(f"This follow-up, which asks whether another model family solves the task the same way, did not run in "
                  f"this render: {extension} loads, but the fast engines do not implement its architecture "
                  f"({str(error).split(' (model')[0].removeprefix('The fast engines do not implement ')}), so every "
                  f"analysis would run on the hook-based reference engines, hours on a laptop CPU "
                  f"(`python -m ioi reproduce --model {extension}` runs them).")
    if error is not None:
        return Md(f"This follow-up, which asks whether another model family solves the task the same way, did not run: "
                  f"the model named for it, {extension}, cannot be loaded here ({str(error).split('. ')[0].rstrip('.')}).")
    return None


def model_name(model: str) -> Md:
    return Md(MODEL_FACTS.get(model, (model or "n/a",))[0])


def short_name(model: str) -> Md:
    """A model's name for a table's header: 'SmolLM2-135M', 'Gemma 3 270M', a directory's last part."""
    if model in MODEL_FACTS:
        return Md(MODEL_FACTS[model][0].removesuffix("-Instruct"))
    return Md(str(model).rstrip("/").rsplit("/", 1)[-1] or "n/a")


def confounds(main: str, other: str) -> Md:
    """What else, besides the family, differs between two models, as a sentence."""
    if main not in MODEL_FACTS or other not in MODEL_FACTS:
        return Md("Beside the family, the two models may differ in size, training and precision, "
                  "so a difference between them cannot be put down to the family alone.")
    (a, size_a, tune_a, prec_a), (b, size_b, tune_b, prec_b) = MODEL_FACTS[main], MODEL_FACTS[other]
    ratio = max(size_a, size_b) / min(size_a, size_b)
    diffs = [f"size ({size_b}M against {size_a}M parameters, {ratio:.1f}×)" if ratio >= 1.2 else None,
             f"training ({tune_b} against {tune_a})" if tune_a != tune_b else None,
             f"weights ({prec_b} against {prec_a})" if prec_a != prec_b else None]
    diffs = [d for d in diffs if d]
    noise = (" Quantised weights carry rounding noise that can blur small head effects, so a missing class"
             " is weaker evidence than a present one." if "4-bit" in prec_a + prec_b else "")
    if not diffs:
        return Md(f"{b} and {a} differ in family but match in size, training and precision.{noise}")
    return Md(f"Beside the family, {b} differs from {a} in {listing(diffs)}, so a difference between "
              f"them cannot be put down to the family alone, and a shared class is the stronger finding.{noise}")


def verdict_groups(findings: pd.DataFrame, ids) -> Md:
    """How the claims `ids` (rows of `ioi.claims_table.claims`) came out, for prose: '2 of 5 as the
    paper reports (S-inhibition and the MLPs), 2 only partly (...) and 1 not at all (...)'."""
    rows = findings[findings.claim_id.isin(ids)]
    wording = {"reproduced": "as the paper reports", "partly": "only partly", "not reproduced": "not at all",
               "not measured": "could not be measured"}
    parts = [f"{int((rows.verdict == v).sum())} {words} ({listing(list(rows.short[rows.verdict == v]))})"
             for v, words in wording.items() if (rows.verdict == v).any()]
    if not parts:
        return Md("none was tested")
    parts[0] = parts[0].replace(" ", f" of {len(rows)} ", 1)
    return listing(parts)


def size_confounds(models) -> Md:
    """What else, besides size, differs between the sizes of a ladder (`MODEL_FACTS`), as a sentence."""
    known = [MODEL_FACTS[m] for m in models if m in MODEL_FACTS]
    if len(known) < 2 or len(known) < len(models):
        return Md("The sizes may also differ in training data and precision, which a size comparison cannot separate.")
    trainings, precisions = {k[2] for k in known}, {k[3] for k in known}
    shared = f"all are {known[0][2]}" if len(trainings) == 1 else f"their training differs ({listing([f'{k[0]}: {k[2]}' for k in known])})"
    stored = (f"each is stored as {known[0][3]}" if len(precisions) == 1 else
              f"they are stored at different precisions ({listing([f'{k[0]}: {k[3]}' for k in known])}), and rounding noise "
              "can blur small head effects in the coarser one")
    return Md(f"Besides size, {shared}; {stored}.")


def family_phrases(ext_study=None, classes=None, scores=None, templates=None, model: str = "") -> dict:
    """Every number the second-family follow-up prints, as phrases; with no results (the
    section is hidden because its model cannot run) each phrase reads "n/a"."""
    from collections import defaultdict

    from ioi.report.tables import order_summary

    phrases = defaultdict(lambda: Md("n/a"))
    if ext_study is None:
        return phrases
    diff = order_summary(templates)[2]
    ld = ext_study.baseline_summary().set_index("metric").loc["logit_diff"]
    circuit, shape = ext_study.circuit(), ext_study.shape  # found the paper's way (`paths_discovery`)
    phrases.update(
        shape=Md(f"{count(shape['n_layers'], 'layer')} of {count(shape['n_heads'], 'head')}"),
        logit_diff=ci_text(ld["mean"], ld.ci_low, ld.ci_high),
        circuit_size=count(len(circuit.heads), "head"),
        circuit_share=pct(len(circuit.heads) / (shape['n_layers'] * shape['n_heads'])),
        found_classes=class_text(classes, model + " (paths)"),
        checks=check_text(ext_study.paper_circuit_table()),
        paper_classes=class_text(classes, "gpt2-small (Wang et al.)"),
        induction=best_heads(scores, "induction_random"),
        duplicate=best_heads(scores, "duplicate_token_random"),
        order_difference=ci_text(diff.faithfulness, diff.faithfulness_ci_low, diff.faithfulness_ci_high),
    )
    return phrases


def circuit_origin(circuit, table: pd.DataFrame | None, paths_config) -> Md:
    """Where the study's circuit comes from, for prose: the paper's heads (`table` None), or the
    paper-way discovery (`ioi.circuits.paths_discovery`) with its thresholds and flagged heads."""
    n = count(len(circuit.heads), "head")
    if table is None:
        return Md(f"the paper's {n}")
    c = paths_config
    return Md(
        f"found the paper's way, backwards from the answer by path patching: {n}, each kept because its path "
        f"into the logits (at least {pct(c.logits_share)} of the logit difference), into the name movers' queries "
        f"(at least {pct(c.queries_share)}), or into the S-inhibition heads' values or the induction heads' keys "
        f"(at least {pct(c.values_share)}) carries the signal, and classed by that path; {check_text(table)}"
    )


def check_text(table: pd.DataFrame) -> Md:
    """How many of the paper-way discovery's kept heads failed their class's check, as a clause."""
    flagged = int((~table[table.kept].check.astype(bool)).sum())
    if flagged == 0:
        return Md("every one of them passes its class's attention or copy-score check")
    if flagged == 1:
        return Md("1 of them fails its class's attention or copy-score check and is kept but flagged")
    return Md(f"{fmt(flagged)} of them fail their class's attention or copy-score check and are kept but flagged")


def curve_summary(summary: pd.DataFrame, ablation: str = "mean") -> Md:
    """'paths 6, activation patching 12, ... heads' (the smallest k reaching the target per
    ranking) and their areas, for one ablation of `Study.faithfulness_curve_summary`."""
    rows = summary[summary.ablation == ablation]
    reach = [f"{r.method} {'never' if pd.isna(r.smallest_k) else int(r.smallest_k)}" for r in rows.itertuples()]
    areas = [f"{r.method} {fmt(r.area)}" for r in rows.itertuples()]
    return Md(f"{listing(reach)} heads; areas under the curve {listing(areas)}")
