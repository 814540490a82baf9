"""Each figure function turns a small hand-made frame (the columns its Study method returns) into
a valid altair chart, and `figures.show` gives HTML an interactive chart and a PDF a static image."""

from __future__ import annotations

import json

import altair as alt
import numpy as np
import pandas as pd
import pytest

from ioi.report import figures, tables

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
    nodes = pd.DataFrame({"id": ["0.1", "2.3", "logits"], "class": ["induction", "name mover", "logits"],
                          "layer": [0, 2, 3], "head": [1, 3, -1], "x": [0.0, 2.0, 3.0], "y": [0.0, 1.0, 0.5],
                          "row": [0, 1, -1]})
    edges = pd.DataFrame({"source": ["0.1", "2.3"], "target": ["2.3", "logits"], "receiver": ["name movers", "logits"],
                          "strength": [0.3, -0.1], "x": [0.0, 2.0], "y": [0.0, 1.0], "x2": [2.0, 3.0], "y2": [1.0, 0.5],
                          "sign": ["helps IO", "hurts IO"], "size": [0.3, 0.1]})
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
    }


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
    "circuit_diagram": lambda f: figures.circuit_diagram(f["nodes"], f["edges"]),
    "faithfulness_by_template": lambda f: figures.faithfulness_by_template(f["templates"]),
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
    layers = figures.circuit_diagram(frames["nodes"], frames["edges"]).to_dict()["layer"]
    rule = next(l for l in layers if l["mark"]["type"] == "rule")
    assert rule["encoding"]["strokeWidth"]["field"] == "size"
    assert rule["encoding"]["color"]["field"] == "sign"


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
    monkeypatch.setattr(figures, "_bundle_sent", False)
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
