"""The circuit diagram, drawn as the paper's Figure 2, and a check that its labels never meet.

A DataFrame of nodes and edges (`ioi.report.tables.circuit_graph`) in, an altair chart out, as
every figure in `ioi.report.figures`; `label_problems` reads the boxes of every label back from
the chart's own spec, so a test (and the report) can prove that no two overlap.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


CLASSES = dict(zip(
    ["name mover", "backup name mover", "negative name mover", "S-inhibition", "induction",
     "duplicate token", "previous token", "other", "found", "logits", "not in circuit"],
    ["#1f77b4", "#9ecae1", "#d62728", "#ff7f0e", "#2ca02c", "#98df8a", "#9467bd",
     "#8c564b", "#7f7f7f", "#000000", "#dddddd"],
))  # class -> colour, the same in every figure


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
