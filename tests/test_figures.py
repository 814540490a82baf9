"""Each figure function turns a small hand-made frame (the columns its Study method returns) into
a valid altair chart, and `figures.show` gives HTML an interactive chart and a PDF a static image."""

from __future__ import annotations

import json

import altair as alt
import numpy as np
import pandas as pd
import pytest

from ioi.circuits import paths_discovery
from ioi.report import diagram, figures, tables

LAYERS, HEADS = 3, 4


def grid(value: str, **extra) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"layer": l, "head": h, value: rng.normal(), **extra} for l in range(LAYERS) for h in range(HEADS)]
    return pd.DataFrame(rows)


@pytest.fixture
def frames() -> dict:
    rng = np.random.default_rng(0)
    positions = ["IO", "S1", "S1+1", "S2", "END"]
    patterns = pd.DataFrame(
        [{"head": hd, "query": f"{q}:t{q}", "key": f"{k}:t{k}", "query_pos": q, "key_pos": k, "attention": 1 / (q + 1)}
         for hd in ("0.1", "2.3") for q in range(4) for k in range(q + 1)]
    )
    nodes, edges = tables.graph_from_paths(pd.DataFrame({
        "layer": [0, 1, 2], "head": [1, 2, 3], "class": ["induction", "S-inhibition", "name mover"], "step": [3, 2, 1],
        "effect": [0.3, 0.2, -0.1], "check": [True, False, True]}))
    return {
        "dla": grid("mean", ci_low=-1.0, ci_high=1.0, n=8),
        "patching": grid("patched_metric", logit_diff=0.0),
        "residual": pd.DataFrame([{"layer": l, "position": p, "patched_metric": rng.random()} for l in range(LAYERS) for p in positions]),
        "layers": pd.DataFrame([{"layer": l, "component": c, "patched_metric": rng.random()} for l in range(LAYERS) for c in ("attn", "mlp")]),
        "lens": pd.DataFrame({"layer": range(LAYERS), "mean": [0.1, 0.5, 1.0], "ci_low": [0.0, 0.3, 0.8], "ci_high": [0.2, 0.7, 1.2], "n": 8}),
        "baseline": pd.DataFrame({"logit_diff": rng.normal(size=16), "order": ["ABBA", "BABA"] * 8}),
        "paths": pd.concat([grid("relative_change", receiver="logits"), grid("relative_change", receiver="name movers")]),
        "patterns": patterns,
        "scores": pd.DataFrame({"head": ["0.1", "2.3"] * 2, "class": ["induction", "not in circuit"] * 2,
                                "score": ["induction"] * 2 + ["copy_score"] * 2, "value": [0.9, 0.1, 0.0, 0.2]}),
        "nodes": nodes, "edges": edges,
        "templates": pd.DataFrame({"template_id": [0, 1], "order": ["BABA", "ABBA"], "n": [4, 4], "faithfulness": [0.9, 1.1],
                                   "faithfulness_ci_low": [0.7, 0.9], "faithfulness_ci_high": [1.1, 1.3]}),
        "sizes": size_rows(["small", "large"], "Ladder", [5e8, 1.5e9]),
        "others": size_rows(["other"], "Other", [1.35e8]),
    }


def size_rows(models, family, n_params) -> pd.DataFrame:
    """`followups.size_sweep`'s columns: every measure of every model, with CIs on some."""
    from ioi.followups import SIZE_CLAIMS, SIZE_COLUMNS

    rows = [{"model": m, "family": family, "n_params": n, "n_layers": 2, "n_heads": 2, "status": "ok", "reason": "",
             "measure": measure, "value": 0.5 + i, "ci_low": 0.4 + i if measure != "name_movers" else np.nan,
             "ci_high": 0.6 + i if measure != "name_movers" else np.nan, "unit": "share", "verdict": "partly", "seconds": 1.0}
            for i, (m, n) in enumerate(zip(models, n_params)) for measure in ("logit_diff", *SIZE_CLAIMS)]
    return pd.DataFrame(rows, columns=SIZE_COLUMNS)


CHARTS = {
    "dla_heatmap": lambda f: figures.dla_heatmap(f["dla"]),
    "head_patching_heatmap": lambda f: figures.head_patching_heatmap(f["patching"]),
    "heads_figure": lambda f: figures.heads_figure(f["dla"], f["patching"]),
    "residual_heatmap": lambda f: figures.residual_heatmap(f["residual"]),
    "layer_patching_bars": lambda f: figures.layer_patching_bars(f["layers"]),
    "residual_figure": lambda f: figures.residual_figure(f["residual"], f["layers"]),
    "logit_lens": lambda f: figures.logit_lens(f["lens"]),
    "baseline_distribution": lambda f: figures.baseline_distribution(f["baseline"]),
    "path_patching_heatmaps": lambda f: figures.path_patching_heatmaps(f["paths"]),
    "attention_heatmap": lambda f: figures.attention_heatmap(f["patterns"]),
    "scores_strip": lambda f: figures.scores_strip(f["scores"]),
    "circuit_diagram": lambda f: diagram.circuit_diagram(f["nodes"], f["edges"]),
    "faithfulness_by_template": lambda f: figures.faithfulness_by_template(f["templates"]),
    "size_chart": lambda f: figures.size_chart(f["sizes"], f["others"]),
}


@pytest.mark.parametrize("name", list(CHARTS))
def test_plot_returns_a_valid_altair_chart(name, frames):
    """The function returns an altair chart whose spec validates against Vega-Lite's schema."""
    chart = CHARTS[name](frames)
    assert isinstance(chart, alt.TopLevelMixin)
    assert chart.to_dict()["$schema"].startswith("https://vega.github.io/schema/vega-lite/")


def test_heatmap_shows_the_data_it_was_given(frames):
    """The head heatmap carries every (layer, head) value unchanged: plots compute nothing."""
    spec = figures.dla_heatmap(frames["dla"]).to_dict()
    values = next(iter(spec["datasets"].values()))
    assert sorted(v["mean"] for v in values) == sorted(frames["dla"]["mean"])


def test_circuit_diagram_sizes_edges_by_effect(frames):
    """Edge width encodes the measured effect size, colour its sign."""
    layers = diagram.circuit_diagram(frames["nodes"], frames["edges"]).to_dict()["layer"]
    rule = next(l for l in layers if l["mark"]["type"] == "rule")
    assert rule["encoding"]["strokeWidth"]["field"] == "size"
    assert rule["encoding"]["color"]["field"] == "sign"


# --- The circuit diagram: every head and class named, no two labels overlapping -------------------

# A crowded circuit: every class, five name movers in layer 10 (as SmolLM2's five in layer 23),
# pairs in adjacent layers, a flagged head, a class outside the paper's (drawn without an edge)
# and paths of all four steps, negative ones included.
CROWDED = [  # class, step, heads, effect of the first (the rest a little weaker)
    ("previous token", 4, ["2.2", "4.11"], 0.03),
    ("duplicate token", 3, ["0.1", "0.10", "3.0"], 0.04),
    ("induction", 3, ["5.5", "5.8", "5.9", "6.9"], 0.05),
    ("S-inhibition", 2, ["7.3", "7.9", "8.6", "8.10"], 0.12),
    ("name mover", 1, ["9.9", "9.6", "10.0", "10.1", "10.2", "10.3", "10.4"], 0.25),
    ("negative name mover", 1, ["10.7", "11.10"], -0.15),
    ("backup name mover", 1, ["9.0", "9.7", "10.6", "10.10", "11.2", "11.9"], 0.02),
    ("other", None, ["4.4"], None),
]
FLAGGED = "5.8"


def crowded_paths() -> pd.DataFrame:
    rows = [{"layer": int(h.split(".")[0]), "head": int(h.split(".")[1]), "class": cls, "step": step,
             "effect": None if effect is None else effect * (1 - 0.1 * i), "check": h != FLAGGED}
            for cls, step, heads, effect in CROWDED for i, h in enumerate(heads)]
    return pd.DataFrame(rows)


@pytest.fixture
def crowded():
    nodes, edges = tables.graph_from_paths(crowded_paths())
    chart = diagram.circuit_diagram(nodes, edges)
    return nodes, edges, chart, chart.to_dict()


def layer_data(spec: dict, mark: str, field: str) -> pd.DataFrame:
    """The data of the first layer of a mark type whose encoding uses `field`."""
    for layer in spec["layer"]:
        kind = layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]
        fields = {e.get("field") for e in layer["encoding"].values() if isinstance(e, dict)}
        if kind == mark and field in fields:
            return pd.DataFrame(spec["datasets"][layer["data"]["name"]])
    raise KeyError((mark, field))


def test_crowded_circuit_names_every_head_and_class_without_overlap(crowded):
    """Every head and every class (and the logits) has a label, no two labels or markers
    overlap, no label leaves the chart and no edge crosses a label, at print size."""
    nodes, _, chart, spec = crowded
    assert diagram.label_problems(chart, nodes) == []
    texts = diagram.label_boxes(spec).query("kind == 'text'").text
    assert {t.rstrip(diagram.FLAG) for t in texts} >= set(nodes.id) | set(nodes["class"]) | {"logits"}
    assert len(nodes) == sum(len(heads) for _, _, heads, _ in CROWDED)
    assert spec["width"] <= 650 and spec["height"] <= 280  # an A4 text width at 96 px an inch


def test_label_check_finds_overlaps_and_missing_labels():
    """The check is not vacuous: two names drawn at one place overlap, and a head or class that
    the chart does not name is reported."""
    frame = pd.DataFrame({"id": ["23.0", "23.1"], "x": [50.0, 52.0], "y": [40.0, 43.0]})
    chart = (alt.Chart(frame).mark_point(size=49).encode(x=alt.X("x:Q", scale=None), y=alt.Y("y:Q", scale=None))
             + alt.Chart(frame).mark_text(align="left", dx=6, fontSize=10).encode(
                 x=alt.X("x:Q", scale=None), y=alt.Y("y:Q", scale=None), text="id:N")).properties(width=100, height=80)
    problems = diagram.label_problems(chart, pd.DataFrame({"id": ["23.0", "23.1", "24.4"], "class": ["name mover"] * 3}))
    assert "text '23.0' overlaps text '23.1'" in problems
    assert "marker '23.0' overlaps marker '23.1'" in problems
    assert "head 24.4 has no label" in problems and "class 'name mover' has no label" in problems


def test_every_path_step_has_its_edges_into_the_class_that_receives_it(crowded):
    """One edge per head whose path was measured, all four steps, each from its head's row to
    the receiving group's port, which names what the path carries."""
    nodes, edges, _, spec = crowded
    drawn = layer_data(spec, "rule", "size")
    assert sorted(drawn.step.unique()) == [1, 2, 3, 4]
    assert set(drawn.source) == set(nodes.id[nodes["class"] != "other"])
    expected = {1: "logits", 2: "name mover", 3: "S-inhibition", 4: "induction"}
    assert all(expected[s] == t for s, t in zip(drawn.step, drawn.target))
    heads = layer_data(spec, "text", "label").set_index("id")
    assert (drawn.y.to_numpy() == heads.loc[drawn.source, "y"].to_numpy()).all()
    groups = layer_data(spec, "rect", "x0").set_index("class")
    assert (drawn.x2.to_numpy() == groups.loc[drawn.target, "x0"].to_numpy()).all()
    assert (drawn.x.to_numpy() == groups.loc[nodes.set_index("id").loc[drawn.source, "class"], "x1"].to_numpy()).all()
    texts = set(diagram.label_boxes(spec).text)
    assert {carries for _, _, _, carries in tables.DISCOVERY_STEPS.values()} <= texts


def test_flagged_heads_are_hollow_and_daggered(crowded):
    """A head that failed its class's check is drawn hollow and named with a dagger, and the
    legend says so; no other head is."""
    _, _, _, spec = crowded
    names = layer_data(spec, "text", "label")
    assert names.label[names.id == FLAGGED].tolist() == [FLAGGED + diagram.FLAG]
    assert not names.label[names.id != FLAGGED].str.contains(diagram.FLAG).any()
    markers = layer_data(spec, "point", "status")
    assert markers.status[markers.id == FLAGGED].tolist() == [diagram.CHECKS[False]]
    assert (markers.status[markers.id != FLAGGED] == diagram.CHECKS[True]).all()
    shape = next(l for l in spec["layer"] if l["encoding"].get("shape", {}).get("field") == "status")["encoding"]["shape"]
    assert dict(zip(shape["scale"]["domain"], shape["scale"]["range"]))[diagram.CHECKS[False]] == diagram.RING
    assert "legend" in shape and shape["legend"] is not None


def test_many_heads_in_one_class_stay_legible():
    """Forty name movers in three layers: the group puts several in a row and still no two
    labels overlap, and the chart stays about as tall as the page allows."""
    paths = pd.DataFrame([{"layer": 20 + i // 15, "head": i % 15, "class": "name mover", "step": 1, "effect": 0.01 * (i + 1),
                           "check": True} for i in range(40)])
    nodes, edges = tables.graph_from_paths(paths)
    chart = diagram.circuit_diagram(nodes, edges)
    assert diagram.label_problems(chart, nodes) == []
    assert chart.to_dict()["height"] <= diagram.MAX_COLUMN_HEIGHT


def test_an_empty_circuit_draws_the_logits_alone():
    """A discovery that keeps no head still gives a chart that renders (no empty legend)."""
    import vl_convert as vlc

    from ioi.circuits.paths_discovery import COLUMNS

    nodes, edges = tables.graph_from_paths(pd.DataFrame(columns=COLUMNS))
    chart = diagram.circuit_diagram(nodes, edges)
    assert diagram.label_problems(chart, nodes) == []
    assert vlc.vegalite_to_png(chart.to_dict()).startswith(b"\x89PNG")


def test_the_graph_has_one_edge_per_measured_path():
    """From the discovery's rows: the previous-token head's edge runs into the induction heads
    (its step 4), a flagged check is kept as a flag, and a head with no step has no edge."""
    nodes, edges = tables.graph_from_paths(crowded_paths())
    assert edges.set_index("source").loc["2.2", "target"] == "induction"
    assert nodes.set_index("id").flagged.to_dict()[FLAGGED] and nodes.flagged.sum() == 1
    assert "4.4" not in set(edges.source) and len(edges) == len(nodes) - 1
    assert (edges.sign[edges.effect < 0] == "hurts IO").all() and (edges["size"] >= 0).all()


def test_a_given_circuit_measures_each_heads_path_into_its_own_receivers():
    """The paper's heads (a circuit given by hand): each head's effect is read from the sweep of
    its class's step, into that class's receivers in this circuit, through the input the
    discovery patches; nothing is checked, so nothing is flagged."""
    from ioi.circuits.criteria import Circuit

    circuit = Circuit({"name mover": ((9, 9),), "S-inhibition": ((7, 3),), "induction": ((5, 5),), "previous token": ((4, 11),)},
                      {c: "END" for c in ("name mover", "S-inhibition", "induction", "previous token")})
    calls = []

    def sweep(receivers, receiver_input, position, first_layer):
        calls.append((receivers, receiver_input, position))
        code = {"logits": 1, "q": 2, "v": 3, "k": 4}[receiver_input or receivers]
        return pd.DataFrame([{"layer": l, "head": h, "relative_change": -code / 10 - l / 1000}
                             for l in range(first_layer, 12) for h in range(12)])

    paths = paths_discovery.measured_paths(circuit, sweep).set_index(["layer", "head"])
    assert (("logits", None, None) in calls and (((9, 9),), "q", "END") in calls
            and (((7, 3),), "v", "S2") in calls and (((5, 5),), "k", "S1+1") in calls)
    assert paths.effect.to_dict() == pytest.approx({(9, 9): 0.109, (7, 3): 0.207, (5, 5): 0.305, (4, 11): 0.404})
    nodes, edges = tables.graph_from_paths(paths.reset_index())
    assert not nodes.flagged.any() and len(edges) == 4


def _execute_info(tmp_path, monkeypatch, to: str) -> None:
    info = tmp_path / "execute-info.json"
    info.write_text(json.dumps({"document-path": "report.qmd", "format": {"pandoc": {"to": to}}}))
    monkeypatch.setenv("QUARTO_EXECUTE_INFO", str(info))


def test_show_is_interactive_outside_a_render(frames, monkeypatch):
    """Without QUARTO_EXECUTE_INFO (tests, a console) the chart comes back as it is."""
    monkeypatch.delenv("QUARTO_EXECUTE_INFO", raising=False)
    chart = figures.logit_lens(frames["lens"])
    assert figures.output_format() == "html"
    assert figures.show(chart) is chart


def test_show_is_interactive_for_html(frames, tmp_path, monkeypatch):
    """An HTML render gets the altair chart itself, which carries its JavaScript."""
    _execute_info(tmp_path, monkeypatch, "html")
    chart = figures.logit_lens(frames["lens"])
    assert figures.show(chart) is chart


@pytest.mark.parametrize("to", ["typst", "latex", "pdf"])
def test_show_is_a_png_for_pdf_targets(to, frames, tmp_path, monkeypatch):
    """Typst or LaTeX PDFs run no JavaScript: they get a PNG, and nothing interactive."""
    _execute_info(tmp_path, monkeypatch, to)
    shown = figures.show(figures.logit_lens(frames["lens"]))
    assert not isinstance(shown, alt.TopLevelMixin)
    assert shown._repr_png_().startswith(b"\x89PNG")
    assert shown._repr_svg_() is None


def test_show_can_emit_svg_for_pdf_targets(frames, tmp_path, monkeypatch):
    """Asked for SVG, a static render gets SVG text."""
    _execute_info(tmp_path, monkeypatch, "typst")
    shown = figures.show(figures.logit_lens(frames["lens"]), static="svg")
    assert shown._repr_svg_().lstrip().startswith("<svg")


def test_attention_falls_back_to_a_static_heatmap_in_pdf(frames, tmp_path, monkeypatch):
    """In a PDF the circuitsvis widget is replaced by the altair heatmap, as a PNG."""
    _execute_info(tmp_path, monkeypatch, "typst")
    shown = figures.show_attention(frames["patterns"], figures.attention_heatmap(frames["patterns"]))
    assert shown._repr_png_().startswith(b"\x89PNG")


def test_attention_in_html_is_interactive(frames, tmp_path, monkeypatch):
    """In HTML: circuitsvis's widget if installed, else the interactive altair chart."""
    _execute_info(tmp_path, monkeypatch, "html")
    chart = figures.attention_heatmap(frames["patterns"])
    shown = figures.show_attention(frames["patterns"], chart)
    if shown is not chart:  # circuitsvis's view, its JavaScript inlined as a raw HTML block
        markdown = shown._repr_markdown_()
        assert markdown.startswith("```") and "{=html}" in markdown.splitlines()[0]
        assert "CircuitsVis.render(" in markdown and "unpkg.com" not in markdown


def test_html_charts_carry_the_vega_bundle_once_and_load_nothing(frames, tmp_path, monkeypatch):
    """In HTML a chart is drawn by the Vega bundle inlined before the first chart: no CDN."""
    _execute_info(tmp_path, monkeypatch, "html")
    alt.renderers.register(figures.OFFLINE_RENDERER, figures.OfflineRenderer())  # a fresh document
    first, second = (figures.show(figures.logit_lens(frames["lens"]))._repr_mimebundle_() for _ in range(2))
    first, second = (b[0] if isinstance(b, tuple) else b for b in (first, second))
    assert set(first) == {"text/markdown"}  # text/html would make Quarto load require.js from a CDN
    assert first["text/markdown"].count("window.vegaEmbed=") == 1 and "window.vegaEmbed=" not in second["text/markdown"]
    assert "vegaEmbed(\"#" in second["text/markdown"] and "cdn.jsdelivr" not in first["text/markdown"]


def test_one_degenerate_template_cannot_set_the_faithfulness_axis():
    """29 templates near 1 and one with an interval of [-6.5, 7.6] (a logit difference near 0):
    the axis follows the 29, and the outlier is drawn clipped at the edge and marked."""
    rng = np.random.default_rng(0)
    rows = [{"template_id": t, "order": "ABBA" if t % 2 else "BABA", "n": 20, "faithfulness": f,
             "faithfulness_ci_low": f - 0.2, "faithfulness_ci_high": f + 0.2}
            for t, f in enumerate(rng.normal(0.9, 0.1, 29))]
    rows.append({"template_id": 29, "order": "ABBA", "n": 20, "faithfulness": 0.5,
                 "faithfulness_ci_low": -6.5, "faithfulness_ci_high": 7.6})
    table = pd.DataFrame(rows)
    low, high = figures.robust_domain(table.faithfulness_ci_low, table.faithfulness_ci_high)
    assert -1 < low <= 0 and 1 <= high < 2
    spec = figures.faithfulness_by_template(table).to_dict()
    data = pd.DataFrame(next(iter(spec["datasets"].values())))
    clipped = data[data.shown.str.contains("clipped")]
    assert clipped.template_id.tolist() == [29]
    assert clipped.faithfulness_ci_low_shown.iloc[0] == low and clipped.faithfulness_ci_high_shown.iloc[0] == high


def test_path_patching_panels_span_every_layer():
    """A receiver's senders sit below it, but its panel still shows all of the model's layers."""
    paths = pd.concat([
        grid("relative_change", receiver="logits"),
        grid("relative_change", receiver="S-inhibition").query("layer < 1"),
    ])
    spec = figures.path_patching_heatmaps(paths).to_dict()
    assert spec["spec"]["encoding"]["y"]["scale"]["domain"] == list(range(LAYERS))
    assert "resolve" not in spec or "y" not in spec["resolve"].get("scale", {})


def test_size_chart_joins_the_ladder_and_not_the_other_families(frames):
    """A panel per measure; the line and the filled dots are the size ladder's alone, and the
    other families are hollow diamonds."""
    spec = figures.size_chart(frames["sizes"], frames["others"]).to_dict()
    values = next(iter(spec["datasets"].values()))
    assert len({v["panel"] for v in values}) == 6  # the behaviour's share is left to the text
    assert {v["role"] for v in values if v["model"] == "other"} == {"other family"}
    layers = {l["mark"]["type"] if isinstance(l["mark"], dict) else l["mark"]: l for l in spec["spec"]["layer"]}
    ladder = [{"filter": "(datum.role === 'size ladder')"}]
    assert layers["line"]["transform"] == ladder and layers["circle"]["transform"] == ladder
    assert layers["point"]["transform"] == [{"filter": "(!(datum.role === 'size ladder'))"}]
    assert layers["point"]["mark"]["shape"] == "diamond" and layers["point"]["mark"]["filled"] is False
