"""What the report's chapters need beyond the Study: output-format detection, static charts for
PDF, numbers for prose, tidy frames for figures that combine analyses, and the scorecard.

Output format. During a render Quarto sets `QUARTO_EXECUTE_INFO` to a JSON file whose
`format.pandoc.to` names the target ("html", "typst", "latex", ...). A PDF has no JavaScript,
so `show(chart)` hands HTML an interactive altair chart and every other target a PNG made by
vl-convert. Outside a render (tests, a console) the format is "html".

Scorecard. `data/published_claims.csv` holds each published number with the rule that decides
whether we reproduced it (published value inside our 95% CI, within 20%, same sign and top-k,
...) and the name of the measured quantity it maps to. `scorecard(study)` measures each claim,
applies its rule and returns one row per claim. The GPT-2 small numbers are a reference, not a
target, for any other model: there the verdict reads "not comparable", and claims about named
GPT-2 heads are left out because they cannot be measured.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import torch

from ioi.dataset import DATA_DIR

CLAIMS_PATH = DATA_DIR / "published_claims.csv"
PAPER_MODEL = "gpt2-small"  # the model the published numbers were measured on
HTML_FORMATS = {"html", "html4", "html5", "revealjs", "dashboard"}
PNG_SCALE = 2  # about 200 dpi at the default chart size: sharp in a PDF, small on disk

# --- Output format -------------------------------------------------------------------------------


def output_format() -> str:
    """The pandoc target of the render in progress ("html" outside a render)."""
    path = os.environ.get("QUARTO_EXECUTE_INFO")
    if not path or not Path(path).exists():
        return "html"
    fmt = json.loads(Path(path).read_text()).get("format", {})
    to = fmt.get("pandoc", {}).get("to") or fmt.get("identifier", {}).get("base-format", "html")
    return to.split("+")[0].split("-")[0]  # "html5+smart" -> "html5"


def is_html() -> bool:
    return output_format() in HTML_FORMATS


class Static:
    """A static image that Jupyter (and so Quarto) displays by its MIME type; no IPython needed."""

    def __init__(self, data, mime: str):
        self.data, self.mime = data, mime

    def _repr_png_(self):
        return self.data if self.mime == "image/png" else None

    def _repr_svg_(self):
        return self.data if self.mime == "image/svg+xml" else None


def show(chart: alt.TopLevelMixin, static: str = "png"):
    """The chart itself in HTML (interactive); a PNG (or SVG) of it anywhere else."""
    if is_html():
        return chart
    import vl_convert as vlc

    spec = chart.to_dict()
    if static == "svg":
        return Static(vlc.vegalite_to_svg(spec), "image/svg+xml")
    return Static(vlc.vegalite_to_png(spec, scale=PNG_SCALE), "image/png")


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


# --- Tidy frames that combine analyses ------------------------------------------------------------

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


def strongest_senders(paths: pd.DataFrame, k: int = 3) -> dict:
    """For each path-patching step, the k senders whose path carries most of the logit
    difference (largest drop when patched from ABC), as prose; 'not measured' for a step
    whose receiving class the circuit lacks."""
    out = {step: Md(f"not measured, as the circuit has no {cls} heads") for step, (_, cls, _, _) in PATH_STEPS.items()}
    for receiver, frame in paths.groupby("receiver", sort=False):
        top = frame.assign(carried=-frame.relative_change).nlargest(k, "carried")
        out[receiver] = head_values(top, "carried")
    return out


def circuit_graph(study, min_effect: float = 0.02) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nodes (circuit heads and the logits, placed by layer and class) and edges measured by
    path patching, with strength = the share of the logit difference the path carries.

    A path-patching sweep measures a sender against a whole receiving class at once, so an
    edge is drawn from the sender to each head of that class, all with the same strength.
    Edges weaker than `min_effect` are dropped to keep the diagram readable."""
    circuit = study.circuit()
    nodes = _place_nodes(circuit.to_frame(), study.model.cfg.n_layers)
    sweeps = path_patching(study)
    sweeps = sweeps.assign(source=sweeps.layer.astype(str) + "." + sweeps["head"].astype(str))
    sweeps = sweeps.assign(strength=-sweeps.relative_change)  # patching a path that helps lowers the logit difference
    sweeps = sweeps[sweeps.source.isin(nodes.id) & (sweeps.strength.abs() >= min_effect)]
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


def _place_nodes(frame: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """x = layer, y = class row; heads of one class in one layer are stacked a little apart."""
    order = [c for c in CLASS_ORDER if c in set(frame["class"])] + sorted(set(frame["class"]) - set(CLASS_ORDER))
    frame = frame.assign(row=frame["class"].map(order.index)).sort_values(["row", "layer", "head"])
    slot = frame.groupby(["row", "layer"]).cumcount()
    width = frame.groupby(["row", "layer"])["head"].transform("size")
    nodes = frame.assign(
        id=frame.layer.astype(str) + "." + frame["head"].astype(str),
        x=frame.layer.astype(float),
        y=frame.row + (slot - (width - 1) / 2) * 0.22,
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
    from ioi.patching import run_with_cache

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


def show_attention(patterns: pd.DataFrame, chart: alt.TopLevelMixin):
    """circuitsvis's interactive patterns in HTML when it is installed; else `chart`, static."""
    if is_html():
        try:
            import circuitsvis as cv
        except ImportError:
            return show(chart)
        tokens = patterns.drop_duplicates("query_pos").sort_values("query_pos")["query"].str.split(":", n=1).str[1]
        stack = [
            p.pivot(index="query_pos", columns="key_pos", values="attention").fillna(0.0).to_numpy()
            for _, p in patterns.groupby("head", sort=False)
        ]
        return cv.attention.attention_heads(
            attention=np.stack(stack), tokens=tokens.tolist(),
            attention_head_names=list(dict.fromkeys(patterns["head"])),
        )
    return show(chart)


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


def residual_crossover(residual: pd.DataFrame) -> float:
    """The first layer at which patching END restores more than patching S2 (NaN if never)."""
    wide = residual.pivot(index="layer", columns="position", values="patched_metric").sort_index()
    later = wide.index[wide["END"] > wide["S2"]]
    return float(later[0]) if len(later) else float("nan")


# --- Scorecard ------------------------------------------------------------------------------------


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
    "residual.end_overtakes_s2": lambda s, _: Measured(residual_crossover(s.residual_patching())),
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


def score(claims: pd.DataFrame, measured: dict, comparable: bool) -> pd.DataFrame:
    """One row per claim: published, measured with CI, rule and verdict. `measured` maps the
    measure name to a `Measured`; without `comparable` every verdict is 'not comparable'."""
    rows = []
    for claim in claims.itertuples(index=False):
        m = measured[claim.measure]
        rule_verdict = verdict(claim.rule, claim.published_value, m, claim.published_low, claim.published_high)
        rows.append({
            "claim_id": claim.claim_id, "claim": claim.claim, "published": published_text(claim),
            "measured": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "rank": m.rank,
            "rule": rule_text(claim.rule),
            "verdict": rule_verdict if comparable else "not comparable",
            "source": claim.source, "caveat": claim.caveat,
        })
    return pd.DataFrame(rows)


def scorecard(study, claims: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every published claim the study can measure on its model, measured and judged."""
    claims = load_claims() if claims is None else claims
    comparable = study.config.model == PAPER_MODEL
    if not comparable:  # named GPT-2 heads mean nothing in another model
        claims = claims[claims.scope == "any"]
    return score(claims, {name: measure(study, name) for name in claims.measure.unique()}, comparable)


def tally(card: pd.DataFrame) -> Md:
    """The verdicts counted, for prose: '9 of 17 claims reproduced, 6 did not, ...'."""
    counts = card.verdict.value_counts()
    parts = [f"{counts[v]} {text}" for v, text in (("reproduced", "reproduced"), ("not reproduced", "did not"),
             ("not measured", "could not be measured"), ("not comparable", "are not comparable")) if v in counts]
    parts[0] = parts[0].replace(" ", f" of {len(card)} claims ", 1) if parts else "no claims"
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
