"""The report's figures: a tidy DataFrame in, an altair chart out, one function per figure.

No function here computes anything about the model; each reads the columns a `Study` method
(or `ioi.report.tables.tables`, or a follow-up in `ioi.followups`) returns. Colours: one diverging scale
centred on zero for every signed effect (blue helps IO, red hurts it), one categorical scale for
head classes. `study_figures(study)` draws them all from a study's cached results, for
`python -m ioi reproduce`.

Output format. During a render Quarto sets `QUARTO_EXECUTE_INFO` to a JSON file whose
`format.pandoc.to` names the target ("html", "typst", "latex", ...). A PDF has no JavaScript,
so `show(chart)` hands HTML an interactive altair chart and every other target a PNG made by
vl-convert. Outside a render (tests, a console) the format is "html".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd


from ioi.report import tables
from ioi.report.diagram import CLASSES, circuit_diagram, label_problems  # noqa: F401 (the chapters draw through figures)


HTML_FORMATS = {"html", "html4", "html5", "revealjs", "dashboard"}


PNG_SCALE = 2  # image pixels per chart pixel: sharp in a PDF, small on disk
PRINT_PPI = 96  # a chart pixel prints as a CSS pixel (1/96 inch): 10 px labels read as 7.5 pt


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
    """The chart itself in HTML (interactive, drawn by the Vega bundle inlined in the page, so it
    needs no network); a PNG (or SVG) of it anywhere else."""
    if is_html():
        alt.renderers.enable(OFFLINE_RENDERER)
        return chart
    import vl_convert as vlc

    spec = chart.to_dict()
    if static == "svg":
        return Static(vlc.vegalite_to_svg(spec), "image/svg+xml")
    # vl-convert draws scale * ppi / 72 image pixels per chart pixel and records `ppi` in the
    # PNG, which Typst reads: the image prints at chart pixels / PRINT_PPI inches
    return Static(vlc.vegalite_to_png(spec, scale=72 / PRINT_PPI, ppi=PRINT_PPI * PNG_SCALE), "image/png")


# --- Offline HTML -------------------------------------------------------------------------------
# altair's own HTML renderers load Vega, Vega-Lite and Vega-Embed from a CDN, so an offline
# reader of the HTML would see no charts. vl-convert ships the three libraries as one bundle
# (`javascript_bundle`, which sets window.vegaEmbed); the first chart of a document carries it
# inline, and every chart after it only calls vegaEmbed on its own spec.

OFFLINE_RENDERER = "ioi-offline"


class OfflineRenderer:
    """altair's renderer for one document: its first chart carries the bundle (one kernel renders
    one document: execute.daemon is off in _quarto.yml)."""

    def __init__(self):
        self.bundle_sent = False

    def __call__(self, spec: dict, **_) -> dict:
        import uuid

        import vl_convert as vlc

        div = f"vis-{uuid.uuid4().hex[:12]}"
        bundle = "" if self.bundle_sent else f"<script>{_inline_js(vlc.javascript_bundle())}</script>\n"
        self.bundle_sent = True
        spec_js = _inline_js(json.dumps(spec))
        html = (f'{bundle}<div id="{div}" class="ioi-vega"></div>\n'
                f'<script>vegaEmbed("#{div}", {spec_js}, {{"actions": false}}).catch(console.error);</script>')
        return {"text/markdown": raw_html(html)}


def raw_html(html: str) -> str:
    """HTML as a Markdown raw block. Quarto answers any text/html output with require.js and
    jQuery loaded from a CDN (for notebook widgets that assume them); a raw block in Markdown
    reaches the page as it is, with nothing added. The fence is longer than any run of
    backticks in the HTML, so the JavaScript cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", html)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{{=html}}\n{html}\n{fence}"


def _inline_js(code: str) -> str:
    """JavaScript safe inside an HTML <script>: a literal "</script" would end it early."""
    return code.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


alt.renderers.register(OFFLINE_RENDERER, OfflineRenderer())


class InlineHTML:
    """HTML that Quarto inserts as it is (as a raw block: see `raw_html`)."""

    def __init__(self, html: str):
        self.html = html

    def _repr_markdown_(self) -> str:
        return raw_html(self.html)


def show_attention(patterns: pd.DataFrame, chart: alt.TopLevelMixin):
    """circuitsvis's interactive patterns in HTML when it is installed, with its JavaScript
    inlined (circuitsvis itself would import it from unpkg.com whenever the machine is online);
    else `chart`, static."""
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
        rendered = cv.attention.attention_heads(
            attention=np.stack(stack), tokens=tokens.tolist(),
            attention_head_names=list(dict.fromkeys(patterns["head"])),
        )
        return InlineHTML(rendered.local_src)
    return show(chart)


DIVERGING = alt.Scale(scheme="redblue", domainMid=0)




def _class_scale(classes) -> alt.Scale:
    """The class colours, listing only the classes present (in the fixed order)."""
    present = [c for c in CLASSES if c in set(classes)]
    return alt.Scale(domain=present, range=[CLASSES[c] for c in present])


WIDTH = 260  # one panel; two (with their legends) fit side by side on an A4 page
# a deep model's layers are too many to label every one at print size: every other one
LAYER_AXIS = alt.Axis(labelOverlap="parity")


def _head_label(frame: pd.DataFrame) -> pd.Series:
    return frame.layer.astype(str) + "." + frame["head"].astype(str)


def head_heatmap(frame: pd.DataFrame, value: str, title: str, legend: str | None = None) -> alt.Chart:
    """Layer (rows) by head (columns), coloured by a signed `value`."""
    return alt.Chart(frame.assign(name=_head_label(frame)), title=title).mark_rect().encode(
        x=alt.X("head:O", title="head", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", axis=LAYER_AXIS),
        color=alt.Color(f"{value}:Q", scale=DIVERGING, title=legend or value),
        tooltip=["name:N", alt.Tooltip(f"{value}:Q", format=".3f")],
    ).properties(width=WIDTH, height=WIDTH * 0.65)


def dla_heatmap(attributions: pd.DataFrame) -> alt.Chart:
    """Direct logit attribution per head (`Study.head_attributions`)."""
    return head_heatmap(attributions, "mean", "Direct logit attribution", "logit diff")


def head_patching_heatmap(patching: pd.DataFrame, title: str = "Activation patching, head outputs") -> alt.Chart:
    """Normalised metric after patching each head's clean output into the ABC run."""
    return head_heatmap(patching, "patched_metric", title, "restored")


def heads_figure(attributions: pd.DataFrame, patching: pd.DataFrame) -> alt.HConcatChart:
    """DLA and activation patching side by side: what writes to the logits, what matters."""
    return alt.hconcat(dla_heatmap(attributions), head_patching_heatmap(patching)).resolve_scale(color="independent")


def residual_heatmap(residual: pd.DataFrame) -> alt.Chart:
    """Residual-stream patching (`Study.residual_patching`): layer by named position."""
    return alt.Chart(residual, title="Residual stream patching").mark_rect().encode(
        x=alt.X("position:N", sort=["IO", "S1", "S1+1", "S2", "END"], title="position"),
        y=alt.Y("layer:O", title="layer (residual stream before it)", axis=LAYER_AXIS),
        color=alt.Color("patched_metric:Q", scale=DIVERGING, title="restored"),
        tooltip=["layer:O", "position:N", alt.Tooltip("patched_metric:Q", format=".3f")],
    ).properties(width=WIDTH * 0.6, height=WIDTH * 0.65)


def layer_patching_bars(layers: pd.DataFrame) -> alt.Chart:
    """Patching each layer's whole attention or MLP output (`Study.layer_patching`)."""
    return alt.Chart(layers, title="Layer outputs").mark_bar().encode(
        x=alt.X("layer:O"),
        y=alt.Y("patched_metric:Q", title="restored"),
        xOffset="component:N",
        color=alt.Color("component:N", title="output"),
        tooltip=["layer:O", "component:N", alt.Tooltip("patched_metric:Q", format=".3f")],
    ).properties(width=WIDTH, height=WIDTH * 0.65)


def residual_figure(residual: pd.DataFrame, layers: pd.DataFrame) -> alt.HConcatChart:
    return alt.hconcat(residual_heatmap(residual), layer_patching_bars(layers))


def logit_lens(lens: pd.DataFrame) -> alt.LayerChart:
    """The logit difference read off the residual stream at END after each layer, with CI."""
    base = alt.Chart(lens, title="Logit lens at END").encode(x=alt.X("layer:Q", title="layer"))
    band = base.mark_area(opacity=0.3).encode(y=alt.Y("ci_low:Q", title="logit difference"), y2="ci_high:Q")
    return (band + base.mark_line(point=True).encode(y="mean:Q")).properties(width=WIDTH, height=WIDTH * 0.6)


def baseline_distribution(per_prompt: pd.DataFrame) -> alt.Chart:
    """Per-prompt logit difference (`Study.baseline`), by name order."""
    return alt.Chart(per_prompt, title="Logit difference per prompt").mark_bar(opacity=0.7).encode(
        x=alt.X("logit_diff:Q", bin=alt.Bin(maxbins=30), title="logit(IO) − logit(S)"),
        y=alt.Y("count():Q", stack=None, title="prompts"),
        color=alt.Color("order:N", title="template"),
    ).properties(width=WIDTH, height=WIDTH * 0.6)


def path_patching_heatmaps(paths: pd.DataFrame, n_layers: int | None = None) -> alt.FacetChart:
    """Path patching (`ioi.report.tables.path_patching`): one heatmap per receiver, coloured by the
    change in logit difference relative to clean (negative: the path carries the signal).
    Every panel spans all `n_layers` layers (default: those of the logits step, which sends from
    every head), so a receiver's senders, which sit below it, are seen at their depth."""
    n_layers = int(paths.layer.max()) + 1 if n_layers is None else n_layers
    height = max(WIDTH * 0.5, 4.5 * n_layers)  # a row per layer for deep models
    return alt.Chart(paths.assign(name=_head_label(paths))).mark_rect().encode(
        x=alt.X("head:O", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", scale=alt.Scale(domain=list(range(n_layers))),
                axis=alt.Axis(values=list(range(0, n_layers, 1 if n_layers <= 12 else 2)))),
        color=alt.Color("relative_change:Q", scale=DIVERGING, title="Δ logit diff / clean"),
        tooltip=["receiver:N", "name:N", alt.Tooltip("relative_change:Q", format=".3f")],
    ).properties(width=WIDTH * 0.6, height=height).facet(
        column=alt.Column("receiver:N", title="receiver", sort=["logits", "name movers", "S-inhibition"])
    )


def attention_heatmap(patterns: pd.DataFrame) -> alt.FacetChart:
    """Attention of a few heads on one prompt (`Study.attention_patterns`)."""
    order = patterns.drop_duplicates("query_pos").sort_values("query_pos")["query"].tolist()
    return alt.Chart(patterns).mark_rect().encode(
        x=alt.X("key:N", sort=order, title="key (attended to)"),
        y=alt.Y("query:N", sort=order, title="query"),
        color=alt.Color("attention:Q", scale=alt.Scale(scheme="blues", domain=[0, 1])),
        tooltip=["head:N", "query:N", "key:N", alt.Tooltip("attention:Q", format=".2f")],
    ).properties(width=WIDTH * 0.55, height=WIDTH * 0.55).facet(facet=alt.Facet("head:N", title="head"), columns=2)


def scores_strip(scores: pd.DataFrame) -> alt.Chart:
    """Each head's classification scores (long frame: head, score, value, class), circuit
    heads coloured by class: the score that names a class should single out its heads."""
    return alt.Chart(scores, title="Head classification scores").mark_circle(size=45, opacity=0.8).encode(
        x=alt.X("value:Q", title="score"),
        y=alt.Y("score:N", title=None),
        yOffset=alt.YOffset("jitter:Q"),
        color=alt.Color("class:N", scale=_class_scale(scores["class"]), title="class"),
        tooltip=["head:N", "class:N", "score:N", alt.Tooltip("value:Q", format=".2f")],
    ).transform_calculate(jitter="random()").properties(width=WIDTH * 1.6, height=WIDTH * 0.8)


def robust_domain(low: pd.Series, high: pd.Series, keep: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """An axis range that one degenerate row cannot stretch: from the 10th percentile of the
    interval lows to the 90th of the highs (so up to a tenth of the rows on each side may fall
    outside it), always including `keep` (0 = no effect, 1 = all of it), with a 10% margin."""
    lo = min(keep[0], float(np.nanquantile(low, 0.1))) if low.notna().any() else keep[0]
    hi = max(keep[1], float(np.nanquantile(high, 0.9))) if high.notna().any() else keep[1]
    pad = 0.1 * (hi - lo)
    return [lo - pad, hi + pad]


def _clip_marked(frame: pd.DataFrame, value: str, low: str, high: str, domain: list[float]) -> pd.DataFrame:
    """Intervals cut at the axis range, and a `shown` column that says which were cut, so a
    clipped template is drawn (as a triangle at the edge), not hidden and not setting the scale."""
    lo, hi = domain
    cut = (frame[low] < lo) | (frame[high] > hi) | (frame[value] < lo) | (frame[value] > hi)
    return frame.assign(
        shown=np.where(cut, "interval beyond the axis (clipped)", "interval within the axis"),
        **{f"{c}_shown": frame[c].clip(lo, hi) for c in (value, low, high)},
    )


SHOWN_SHAPES = alt.Scale(domain=["interval within the axis", "interval beyond the axis (clipped)"], range=["circle", "triangle-up"])


def faithfulness_by_template(table: pd.DataFrame) -> alt.LayerChart:
    """Per-template faithfulness F(C)/F(M) with its CI (`Study.faithfulness_by_template`); the
    axis is `robust_domain`, and a template whose interval runs past it is clipped and marked."""
    domain = robust_domain(table.faithfulness_ci_low, table.faithfulness_ci_high)
    data = _clip_marked(table, "faithfulness", "faithfulness_ci_low", "faithfulness_ci_high", domain)
    x_scale = alt.Scale(domain=domain, nice=False)
    base = alt.Chart(data, title="Faithfulness per template").encode(
        y=alt.Y("template_id:O", title="template"), color=alt.Color("order:N", title="names")
    )
    bars = base.mark_rule().encode(
        x=alt.X("faithfulness_ci_low_shown:Q", title="F(C) / F(M)", scale=x_scale), x2="faithfulness_ci_high_shown:Q")
    points = base.mark_point(filled=True, size=60).encode(
        x="faithfulness_shown:Q", shape=alt.Shape("shown:N", scale=SHOWN_SHAPES, title=None),
        tooltip=["template_id:O", "order:N", "n:Q", alt.Tooltip("faithfulness:Q", format=".2f"),
                 alt.Tooltip("faithfulness_ci_low:Q", format=".2f"), alt.Tooltip("faithfulness_ci_high:Q", format=".2f")],
    )
    one = alt.Chart(pd.DataFrame({"x": [1.0]})).mark_rule(strokeDash=[4, 4], color="gray").encode(x="x:Q")
    return (bars + points + one).properties(width=WIDTH, height=WIDTH * 0.8)


def size_chart(ladder: pd.DataFrame, others: pd.DataFrame | None = None) -> alt.FacetChart:
    """The size follow-up: one panel per measure (`followups.size_sweep`'s rows; the behaviour's
    share is left to the text, as it sits at 100% on every model here), parameters on a log axis,
    each value with its 95% CI; the sizes of one family as dots joined by a line (the size
    ladder), other families as hollow, unjoined diamonds, so that they cannot be read as more
    sizes. A measure without an interval is a point alone."""
    from ioi.followups import SIZE_CLAIMS
    from ioi.report.text import MEASURE_NAMES

    measures = [m for m in ("logit_diff", *SIZE_CLAIMS) if m != "behaviour"]
    others = pd.DataFrame(columns=ladder.columns) if others is None else others
    data = pd.concat([ladder.assign(role="size ladder"), others.assign(role="other family")], ignore_index=True)
    data = data[(data.status == "ok") & data.measure.isin(measures)].assign(
        panel=lambda f: f.measure.map(MEASURE_NAMES), size=lambda f: f.n_params.astype(float) / 1e6)
    x = alt.X("size:Q", scale=alt.Scale(type="log", nice=False, padding=8), title="parameters (millions)",
              axis=alt.Axis(tickCount=3, grid=False))
    y = alt.Y("value:Q", title=None, scale=alt.Scale(zero=False))
    color = alt.Color("family:N", title="family (joined dots: the sizes of one family; hollow diamonds: other families)",
                      legend=alt.Legend(orient="bottom", direction="horizontal", titleFontWeight="normal", titleLimit=600))
    ladder_only, tooltip = alt.datum.role == "size ladder", ["model:N", alt.Tooltip("value:Q", format=".2f"), "verdict:N"]
    bars = alt.Chart().mark_rule().encode(x, alt.Y("ci_low:Q"), alt.Y2("ci_high:Q"), color)
    line = alt.Chart().transform_filter(ladder_only).mark_line(strokeWidth=1.5).encode(x, y, color, detail="family:N")
    sizes = alt.Chart().transform_filter(ladder_only).mark_circle(size=45, opacity=1).encode(x, y, color, tooltip=tooltip)
    others = alt.Chart().transform_filter(~ladder_only).mark_point(shape="diamond", size=70, strokeWidth=1.8, filled=False).encode(
        x, y, color, tooltip=tooltip)
    panel = alt.layer(bars, line, sizes, others, data=data).properties(width=165, height=70)
    order = [MEASURE_NAMES[m] for m in measures]
    return panel.facet(facet=alt.Facet("panel:N", sort=order, title=None, header=alt.Header(labelFontSize=9)),
                       columns=3).resolve_scale(y="independent")


def template_chart(sweep: pd.DataFrame):
    """Faithfulness per template (x) with 95% CIs, coloured by name order; the pooled mean of
    each order as a dotted rule, full faithfulness (1) as a grey dashed rule; one row of
    panels per model (`sweep` may hold several models' `template_sweep`s). The y axis is
    `robust_domain` over the templates, so one template with a near-zero logit difference (an
    undefined ratio) is drawn clipped and marked rather than flattening the rest."""
    data = sweep[sweep.level != "difference"].reset_index(drop=True)
    data = data.assign(template=data.template_id.astype(float))
    rows = data[data.level == "template"]
    domain = robust_domain(rows.faithfulness_ci_low, rows.faithfulness_ci_high)
    data = _clip_marked(data, "faithfulness", "faithfulness_ci_low", "faithfulness_ci_high", domain)
    x = alt.X("template:O", title="template id (2k: BABA, 2k+1: its ABBA version)")
    y = alt.Y("faithfulness_shown:Q", title="F(C)/F(M)", scale=alt.Scale(domain=domain, nice=False))
    color = alt.Color("order:N", title="name order")
    per_template = alt.Chart().transform_filter(alt.datum.level == "template")
    points = per_template.mark_point(filled=True).encode(
        x, y, color, shape=alt.Shape("shown:N", scale=SHOWN_SHAPES, title=None),
        tooltip=["template:O", "order:N", alt.Tooltip("faithfulness:Q", format=".2f"),
                 alt.Tooltip("faithfulness_ci_low:Q", format=".2f"), alt.Tooltip("faithfulness_ci_high:Q", format=".2f")])
    bars = per_template.mark_rule().encode(x, alt.Y("faithfulness_ci_low_shown:Q"), alt.Y2("faithfulness_ci_high_shown:Q"), color)
    pooled = alt.Chart().transform_filter(alt.datum.level == "order").mark_rule(strokeDash=[2, 2]).encode(y, color)
    one = alt.Chart().mark_rule(color="gray", strokeDash=[6, 3]).encode(y=alt.datum(1.0))
    layered = alt.layer(bars, points, pooled, one, data=data).properties(width=440, height=70)
    return layered.facet(row=alt.Row("model:N", title=None)).configure_legend(orient="right")


def study_figures(study) -> dict[str, alt.TopLevelMixin]:
    """Every figure of the report, from the study's cached results (name -> chart)."""
    patterns = study.attention_patterns(tuple(tables.key_heads(study)))
    return {
        "baseline_distribution": baseline_distribution(study.baseline()),
        "heads": heads_figure(study.head_attributions(), study.head_patching()),
        "residual": residual_figure(study.residual_patching(), study.layer_patching()),
        "logit_lens": logit_lens(study.logit_lens()),
        "path_patching": path_patching_heatmaps(tables.path_patching(study)),
        "attention": attention_heatmap(patterns),
        "scores": scores_strip(tables.scores_long(study)),
        "circuit": circuit_diagram(*tables.circuit_graph(study)),
        "faithfulness_curve": faithfulness_curve_chart(study.faithfulness_curve()),
        "faithfulness_by_template": faithfulness_by_template(study.faithfulness_by_template()),
    }


def faithfulness_curve_chart(frame: pd.DataFrame) -> alt.FacetChart:
    """Faithfulness of the top-k heads against k (log scale), one line per ranking method with its
    95% band, random as the mean over its seeds with the band of min and max over seeds; single
    circuits (a method with one k) as diamonds; one panel per ablation; the 0.8 target dashed."""
    curves = frame.groupby("method").k.transform("nunique") > 1
    is_random = frame.method == "random"
    columns = ["method", "ablation", "k", "faithfulness", "ci_low", "ci_high"]
    spread = frame[is_random].groupby(["ablation", "k"]).faithfulness
    random = spread.mean().rename("faithfulness").to_frame().assign(
        ci_low=spread.min(), ci_high=spread.max(), method="random (mean; band: seeds)"
    ).reset_index()
    data = pd.concat([
        frame[curves & ~is_random][columns].assign(kind="curve"),
        random[columns].assign(kind="curve"),
        frame[~curves][columns].assign(kind="point"),
    ], ignore_index=True)
    x = alt.X("k:Q", scale=alt.Scale(type="log"), title="heads kept (k, log scale)")
    tooltip = ["method", "ablation", "k", alt.Tooltip("faithfulness:Q", format=".2f")]
    base = alt.Chart().encode(x=x)
    on_curve = base.transform_filter(alt.datum.kind == "curve")
    band = on_curve.mark_area(opacity=0.15).encode(
        y=alt.Y("ci_low:Q", title="faithfulness F(C) / F(M)"), y2="ci_high:Q", color=alt.Color("method:N", title="ranking")
    )
    line = on_curve.mark_line(point=True).encode(y="faithfulness:Q", color="method:N", tooltip=tooltip)
    points = base.transform_filter(alt.datum.kind == "point").mark_point(
        shape="diamond", size=90, filled=True, color="black"
    ).encode(y="faithfulness:Q", tooltip=tooltip)
    target = alt.Chart().mark_rule(strokeDash=[4, 4], color="gray").encode(y=alt.datum(0.8))
    return alt.layer(band, line, points, target, data=data).properties(width=WIDTH, height=WIDTH * 0.45).facet(
        column=alt.Column("ablation:N", title="ablation")
    )
