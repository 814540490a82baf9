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
_bundle_sent = False  # one kernel renders one document (execute.daemon is off in _quarto.yml)


def _offline_html(spec: dict, **_) -> dict:
    global _bundle_sent
    import uuid

    import vl_convert as vlc

    div = f"vis-{uuid.uuid4().hex[:12]}"
    bundle = "" if _bundle_sent else f"<script>{_inline_js(vlc.javascript_bundle())}</script>\n"
    _bundle_sent = True
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


alt.renderers.register(OFFLINE_RENDERER, _offline_html)


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


CLASSES = dict(zip(
    ["name mover", "backup name mover", "negative name mover", "S-inhibition", "induction",
     "duplicate token", "previous token", "other", "found", "logits", "not in circuit"],
    ["#1f77b4", "#9ecae1", "#d62728", "#ff7f0e", "#2ca02c", "#98df8a", "#9467bd",
     "#8c564b", "#7f7f7f", "#000000", "#dddddd"],
))  # class -> colour, the same in every figure


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


# --- The circuit diagram ----------------------------------------------------------------------
# Drawn as the paper's Figure 2: each class a labelled group, groups in columns in the order the
# signal flows (previous token -> duplicate token and induction -> S-inhibition -> the name
# movers -> logits), each head named inside its group, and one edge per head for the path that
# put it in the circuit, into the group that receives it, labelled there by what it carries.
# Every mark sits at a position computed here in chart pixels (x and y with `scale=None`), and
# heads are stacked in rows inside their group, so two labels cannot meet however many heads
# share a layer or a class; `label_problems` reads the boxes back from the chart to prove it.

FLOW = (  # the columns, left to right; other classes go last, under the logits
    ("previous token",), ("duplicate token", "induction"), ("S-inhibition",),
    ("name mover", "negative name mover", "backup name mover"),
)
FONT, SMALL = 10, 9  # px: head names and class titles; what a path carries (7.5 and 6.75 pt)
LINE = 1.25  # a line of text is this many font sizes tall
ROW = 13  # px from one head's row to the next
PAD, GROUP_GAP, COLUMN_GAP = 5, 7, 30  # px inside a group, between groups, between columns (the edges')
MARK = 7  # px: a head's marker, its diameter
MAX_COLUMN_HEIGHT = 240  # px; a taller column puts its heads two (three, ...) to a row
FLAG = "†"  # after the name of a head that failed its class's check
CHECKS = {True: "check passed", False: f"{FLAG} check failed (kept)", None: "not checked"}  # a class's check
RING = "M-1,0A1,1,0,1,0,1,0A1,1,0,1,0,-1,0ZM-0.5,0A0.5,0.5,0,1,1,0.5,0A0.5,0.5,0,1,1,-0.5,0Z"  # a hollow circle
SHAPES = {CHECKS[True]: "circle", CHECKS[False]: RING, CHECKS[None]: "circle"}


def text_width(text: str, size: int | float) -> float:
    """The width of one line of text in pixels, on the safe side. Measured in vl-convert's
    sans-serif (Arial's widths), this report's labels run 0.40 to 0.54 em a character, bold
    included, and m or W 0.88 em; we count 0.6 em, 0.9 em for m, w, M, W and 0.75 em for other
    capitals."""
    em = sum((0.9 if c in "mwMW" else 0.75 if c.isupper() else 0.6 for c in text), 0.0)
    return em * size


def _group_height(n_rows: int, receives: bool) -> float:
    return 2 * PAD + LINE * FONT + (LINE * SMALL if receives else 0) + n_rows * ROW


def circuit_layout(nodes: pd.DataFrame, edges: pd.DataFrame, max_column_height: int | float = MAX_COLUMN_HEIGHT) -> dict:
    """Where everything of `circuit_diagram` goes, in chart pixels (y down): `groups` (a box per
    class and one for the logits, with its title and, where it receives a path, the port where
    those edges arrive and what they carry), `heads` (marker and name), `edges` (from the
    sender's group, at its head's row, to the receiving group's port), and the chart's `width`
    and `height`. Groups stack in columns and heads in cells as wide as the widest name, so
    nothing can overlap; a column taller than `max_column_height` puts more heads in a row."""
    heads = nodes.sort_values(["layer", "head"]).assign(
        label=lambda f: f.id + np.where(f.flagged.astype(bool), FLAG, ""),
        colour=lambda f: f["class"].map(CLASSES).fillna(CLASSES["other"]),
    )
    present = list(dict.fromkeys(heads["class"]))
    known = {c for column in FLOW for c in column}
    columns = [[c for c in column if c in present] for column in FLOW]
    columns = [c for c in columns if c] + [["logits", *[c for c in present if c not in known]]]
    carries = dict(zip(edges.target, edges.carries))
    cell = MARK + 3 + max([text_width(l, FONT) for l in heads.label] or [0]) + 8

    specs = []  # per column: its classes, heads per row, rows per class, width, height
    for column in columns:
        members = {c: heads[heads["class"] == c] for c in column}
        most = max([len(m) for m in members.values()] + [1])
        for per_row in range(1, most + 1):
            rows = {c: -(-len(m) // per_row) for c, m in members.items()}
            height = sum(_group_height(rows[c], c in carries) for c in column) + GROUP_GAP * (len(column) - 1)
            if height <= max_column_height:
                break
        width = 2 * PAD + max(max(text_width(c, FONT), text_width(carries.get(c, ""), SMALL),
                                  min(per_row, len(members[c])) * cell) for c in column)
        specs.append((column, members, per_row, rows, width, height))

    chart_height = max(spec[5] for spec in specs)
    groups, placed, x = [], [], 0.0
    for column, members, per_row, rows, width, height in specs:
        y = (chart_height - height) / 2  # each column centred
        for c in column:
            h = _group_height(rows[c], c in carries)
            top = y + PAD + LINE * FONT + (LINE * SMALL if c in carries else 0)
            groups.append({"class": c, "x0": x, "x1": x + width, "y0": y, "y1": y + h,
                           "colour": CLASSES.get(c, CLASSES["other"]), "carries": carries.get(c, ""),
                           "title_x": x + PAD, "title_y": y + PAD, "port_x": x, "port_y": y + PAD + LINE * (FONT + SMALL / 2),
                           "arrow_x": x - 2})
            for i, head in enumerate(members[c].id):
                placed.append({"id": head, "x": x + PAD + MARK / 2 + (i % per_row) * cell,
                               "y": top + (i // per_row + 0.5) * ROW, "right": x + width})
            y += h + GROUP_GAP
        x += width + COLUMN_GAP
    groups = pd.DataFrame(groups)
    heads = heads.merge(pd.DataFrame(placed, columns=["id", "x", "y", "right"]), on="id")
    heads = heads.assign(label_x=heads.x + MARK / 2 + 3)
    ports = groups.set_index("class")[["port_x", "port_y"]]
    edges = edges.merge(heads[["id", "right", "y"]].rename(columns={"id": "source", "right": "x"}), on="source")
    edges = edges.join(ports.rename(columns={"port_x": "x2", "port_y": "y2"}), on="target").dropna(subset=["x2"])
    return {"groups": groups, "heads": heads, "edges": edges, "width": x - COLUMN_GAP, "height": chart_height}


def _px(field: str, channel=alt.X):
    """A position in chart pixels: no scale, no axis."""
    return channel(f"{field}:Q", scale=None, axis=None)


def circuit_diagram(nodes: pd.DataFrame, edges: pd.DataFrame, max_column_height: int | float = MAX_COLUMN_HEIGHT) -> alt.LayerChart:
    """The circuit as measured (`ioi.report.tables.circuit_graph`: nodes with `id`, `layer`,
    `head`, `class`, `effect`, `check`, `flagged`; edges with `source`, `target`, `carries`,
    `effect`, `size`, `sign`), drawn as in the paper's Figure 2 (see `circuit_layout`): edge
    width is the share of the logit difference the path carries, colour its sign; a hollow
    marker and a dagger mark a head that failed its class's check (kept, as the discovery keeps
    it). `label_problems(chart, nodes)` is empty for every chart this returns."""
    layout = circuit_layout(nodes, edges, max_column_height)
    groups, heads, edges = layout["groups"], layout["heads"], layout["edges"]
    checked = heads["check"].map(lambda c: c is not None and not pd.isna(c))
    statuses = np.where(heads.flagged.astype(bool), CHECKS[False], np.where(checked, CHECKS[True], CHECKS[None]))
    shown = [label for label in CHECKS.values() if label in set(statuses)
             or (label == CHECKS[False] and checked.any())] or [CHECKS[None]]  # "failed" whenever heads were checked
    boxes = alt.Chart(groups).mark_rect(fillOpacity=0.12, strokeWidth=1, cornerRadius=3).encode(
        x=_px("x0"), x2="x1:Q", y=_px("y0", alt.Y), y2="y1:Q",
        fill=alt.Fill("colour:N", scale=None), stroke=alt.Stroke("colour:N", scale=None))
    top = float(max(edges["size"].max(), 0.05)) if len(edges) else 0.05
    lines = alt.Chart(edges).mark_rule(opacity=0.7).encode(
        x=_px("x"), y=_px("y", alt.Y), x2="x2:Q", y2="y2:Q",
        strokeWidth=alt.StrokeWidth("size:Q", title="share of logit diff.", scale=alt.Scale(domain=[0, top], range=[0.6, 5]),
                                    legend=alt.Legend(format=".0%", values=[round(top * share, 2) for share in (1 / 3, 2 / 3, 1)])),
        color=alt.Color("sign:N", scale=alt.Scale(domain=["helps IO", "hurts IO"], range=["#2166ac", "#b2182b"]), title="path"),
        tooltip=["source:N", "target:N", "carries:N", alt.Tooltip("effect:Q", format=".3f")])
    arrows = alt.Chart(groups[groups.carries != ""]).mark_point(shape="triangle-right", filled=True, size=30, color="#444").encode(
        x=_px("arrow_x"), y=_px("port_y", alt.Y))
    markers = alt.Chart(heads.assign(status=statuses)).mark_point(size=MARK ** 2, filled=True, opacity=1).encode(
        x=_px("x"), y=_px("y", alt.Y), fill=alt.Fill("colour:N", scale=None),
        shape=alt.Shape("status:N", title=None, scale=alt.Scale(domain=shown, range=[SHAPES[l] for l in shown]),
                        legend=alt.Legend(symbolFillColor="#555", symbolStrokeWidth=0, symbolOpacity=1, symbolSize=MARK ** 2)),
        tooltip=["id:N", "class:N", alt.Tooltip("effect:Q", format=".3f")])
    names = alt.Chart(heads).mark_text(align="left", baseline="middle", fontSize=FONT).encode(
        x=_px("label_x"), y=_px("y", alt.Y), text="label:N")
    titles = alt.Chart(groups).mark_text(align="left", baseline="top", fontSize=FONT, fontWeight="bold").encode(
        x=_px("title_x"), y=_px("title_y", alt.Y), text="class:N")
    ports = alt.Chart(groups[groups.carries != ""]).mark_text(
        align="left", baseline="middle", fontSize=SMALL, fontStyle="italic", color="#444").encode(
        x=_px("title_x"), y=_px("port_y", alt.Y), text="carries:N")
    return alt.layer(boxes, lines, arrows, markers, names, titles, ports).properties(
        width=layout["width"], height=layout["height"]).configure_legend(
        orient="bottom", direction="horizontal", titleOrient="left").configure_view(stroke=None)


# --- Checking a chart's labels ----------------------------------------------------------------


def label_boxes(spec: dict) -> pd.DataFrame:
    """Every text label and point marker of a layered chart's spec (`chart.to_dict()`), with its
    box in chart pixels (y down): `kind` ("text" or "marker"), `text`, `x0`, `x1`, `y0`, `y1`.
    A position is read from the chart itself: a pixel where its scale is None, else through a
    linear scale with an explicit domain (which any layer may set) onto the chart's width and
    height. Text boxes come from the mark's font size, alignment, baseline and offsets
    (`text_width`, conservative); a marker's box is the square its `size` (an area) spans."""
    width, height = spec.get("width"), spec.get("height")
    layers = spec.get("layer", [spec])
    domains = {}
    for layer in layers:
        for channel in ("x", "y"):
            scale = layer.get("encoding", {}).get(channel, {}).get("scale")
            if isinstance(scale, dict) and "domain" in scale:
                domains.setdefault(channel, scale["domain"])

    def place(values: pd.Series, channel: str, encoding: dict) -> pd.Series:
        if encoding.get("scale", "missing") is None:
            return values.astype(float)
        if channel not in domains:
            raise ValueError(f"cannot place {channel} without a scale domain")
        lo, hi = domains[channel]
        share = (values.astype(float) - lo) / (hi - lo)
        return share * width if channel == "x" else (1 - share) * height

    rows = []
    for layer in layers:
        mark = _mark(layer)
        if mark["type"] not in ("text", "point", "circle"):
            continue
        data = _layer_data(spec, layer)
        if data.empty:
            continue
        encoding = layer["encoding"]
        x = place(data[encoding["x"]["field"]], "x", encoding["x"]) + mark.get("dx", 0)
        y = place(data[encoding["y"]["field"]], "y", encoding["y"]) + mark.get("dy", 0)
        if mark["type"] == "text":
            size = mark.get("fontSize", 11)
            texts = data[encoding["text"]["field"]].astype(str)
            lines = texts.str.split(mark.get("lineBreak", "\n"))
            w = lines.map(lambda ls: max(text_width(l, size) for l in ls))
            h = lines.map(len) * LINE * size
            align, baseline = mark.get("align", "center"), mark.get("baseline", "middle")
            x0 = x - {"left": 0, "center": 0.5, "right": 1}[align] * w
            y0 = y - {"top": 0, "middle": 0.5, "bottom": 1, "alphabetic": 0.8}[baseline] * h
            rows.append(pd.DataFrame({"kind": "text", "text": texts, "x0": x0, "x1": x0 + w, "y0": y0, "y1": y0 + h}))
        else:
            r = np.sqrt(mark.get("size", 30)) / 2
            rows.append(pd.DataFrame({"kind": "marker", "text": data["id"] if "id" in data else "", "x0": x - r, "x1": x + r, "y0": y - r, "y1": y + r}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["kind", "text", "x0", "x1", "y0", "y1"])


def _mark(layer: dict) -> dict:
    return layer["mark"] if isinstance(layer["mark"], dict) else {"type": layer["mark"]}


def _layer_data(spec: dict, layer: dict) -> pd.DataFrame:
    data = layer.get("data", spec.get("data", {}))
    values = data["values"] if "values" in data else spec["datasets"][data["name"]]
    return pd.DataFrame(values)


def label_problems(chart: alt.TopLevelMixin, nodes: pd.DataFrame | None = None) -> list[str]:
    """What makes a chart's labels unreadable, as sentences (none: readable): two labels or
    markers whose boxes overlap (`label_boxes`), a label outside the chart, an edge (a rule)
    drawn across a label, and, given the circuit's `nodes`, a head or a class with no label
    (the logits count as a class)."""
    spec = chart.to_dict()
    boxes = label_boxes(spec)
    problems = []
    b = boxes.to_dict("records")
    for i, one in enumerate(b):
        for two in b[i + 1:]:
            if one["x0"] < two["x1"] and two["x0"] < one["x1"] and one["y0"] < two["y1"] and two["y0"] < one["y1"]:
                problems.append(f"{one['kind']} {one['text']!r} overlaps {two['kind']} {two['text']!r}")
    width, height = spec.get("width", np.inf), spec.get("height", np.inf)
    for one in b:
        if one["kind"] == "text" and (one["x0"] < 0 or one["y0"] < 0 or one["x1"] > width or one["y1"] > height):
            problems.append(f"text {one['text']!r} runs outside the chart")
    texts = [t for t in b if t["kind"] == "text"]
    for x0, y0, x1, y1 in _rules(spec):
        for t in texts:
            if _segment_meets_box(x0, y0, x1, y1, t):
                problems.append(f"an edge crosses text {t['text']!r}")
    if nodes is not None:
        shown = {t["text"].replace("\n", " ") for t in texts}
        names = {t.rstrip(FLAG) for t in shown}
        problems += [f"head {h} has no label" for h in nodes.id if h not in names]
        problems += [f"class {c!r} has no label" for c in [*dict.fromkeys(nodes["class"]), "logits"] if c not in shown]
    return problems


def _rules(spec: dict) -> list[tuple[float, float, float, float]]:
    """The segments of a chart's pixel-placed rules (`scale=None`), as (x0, y0, x1, y1)."""
    out = []
    for layer in spec.get("layer", [spec]):
        encoding = layer.get("encoding", {})
        if _mark(layer)["type"] != "rule" or encoding.get("x", {}).get("scale", "missing") is not None:
            continue
        data = _layer_data(spec, layer)
        fields = [encoding[c]["field"] for c in ("x", "y", "x2", "y2")]
        if data.empty:
            continue
        out += list(data[fields].itertuples(index=False, name=None))
    return out


def _segment_meets_box(x0, y0, x1, y1, box: dict, samples: int = 200) -> bool:
    t = np.linspace(0, 1, samples)
    xs, ys = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    return bool(((xs > box["x0"]) & (xs < box["x1"]) & (ys > box["y0"]) & (ys < box["y1"])).any())


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
