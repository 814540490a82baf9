"""The scorecard's verdicts follow their rules, on hand-made measurements and a hand-made study."""

from __future__ import annotations

from types import SimpleNamespace


import numpy as np
import pandas as pd
import pytest

from ioi.report import figures, scorecard, text
from ioi.report.scorecard import Measured, verdict


@pytest.mark.parametrize(
    "rule,published,measured,expected",
    [
        ("in_ci", 3.56, Measured(3.4, 3.2, 3.7), "reproduced"),
        ("in_ci", 3.56, Measured(2.9, 2.7, 3.1), "not reproduced"),
        ("within_rel:0.2", 0.49, Measured(0.55), "reproduced"),
        ("within_rel:0.2", 0.49, Measured(0.30), "not reproduced"),
        ("within_abs:1", 8.0, Measured(9.0), "reproduced"),
        ("within_abs:1", 8.0, Measured(5.0), "not reproduced"),
        ("same_sign_top:3", 2.99, Measured(2.1, rank=1), "reproduced"),
        ("same_sign_top:3", 2.99, Measured(2.1, rank=4), "not reproduced"),
        ("same_sign_top:3", -1.90, Measured(1.5, rank=2), "not reproduced"),
        ("at_least", 0.01, Measured(0.02), "reproduced"),
        ("at_least", 0.01, Measured(0.005), "not reproduced"),
        ("in_ci", 3.56, Measured(float("nan")), "not measured"),
    ],
)
def test_verdict_follows_its_rule(rule, published, measured, expected):
    """Each rule says 'reproduced' exactly when its condition holds."""
    assert verdict(rule, published, measured) == expected


def test_range_rule_uses_the_published_range():
    """'in_range' compares the measured value with the published low and high."""
    assert verdict("in_range", float("nan"), Measured(0.8), 0.57, 0.99) == "reproduced"
    assert verdict("in_range", float("nan"), Measured(1.2), 0.57, 0.99) == "not reproduced"


def test_every_published_claim_has_a_known_measure_and_rule():
    """The claims file only names measures and rules the scorecard knows."""
    claims = scorecard.load_claims()
    assert claims.claim_id.is_unique
    assert set(claims.measure.str.partition(":")[0]) <= set(scorecard.MEASURES)
    assert set(claims.rule.str.partition(":")[0]) <= set(scorecard.RULE_TEXT)


class FakeStudy:
    """A study whose analyses return hand-made tables: GPT-2 numbers that reproduce the
    baseline's logit difference (3.56 inside [3.3, 3.8]) but not its IO probability."""

    def __init__(self, model: str = "gpt2-small"):
        self.config = SimpleNamespace(model=model)

    def baseline_summary(self):
        return pd.DataFrame({"metric": ["logit_diff", "io_prob", "io_beats_s"], "mean": [3.5, 0.2, 0.99],
                             "ci_low": [3.3, 0.18, 0.97], "ci_high": [3.8, 0.22, 1.0], "n": 100})

    def head_attributions(self):
        return pd.DataFrame({"layer": [9, 10, 9], "head": [9, 7, 6], "mean": [2.5, -1.5, 1.0],
                             "ci_low": [2.0, -2.0, 0.5], "ci_high": [3.0, -1.0, 1.5]})


CLAIMS = pd.DataFrame({
    "claim_id": ["ld", "prob", "dla"],
    "claim": ["logit difference", "IO probability", "9.9 writes IO"],
    "published_value": [3.56, 0.49, 2.99], "published_low": float("nan"), "published_high": float("nan"),
    "measure": ["baseline.logit_diff", "baseline.io_prob", "dla:9.9"],
    "rule": ["in_ci", "within_rel:0.2", "same_sign_top:3"],
    "source": "test", "caveat": "",
})


def test_scorecard_judges_each_claim_on_the_paper_model():
    """On GPT-2 small each verdict is its rule's, with our value and CI beside it."""
    card = scorecard.scorecard(FakeStudy(), CLAIMS).set_index("claim_id")
    assert card.verdict.to_dict() == {"ld": "reproduced", "prob": "not reproduced", "dla": "reproduced"}
    assert (card.loc["ld", "ci_low"], card.loc["ld", "ci_high"]) == (3.3, 3.8)
    assert card.loc["dla", "rank"] == 1


def test_numeric_claims_are_judged_on_gpt2_small_only():
    """On another model GPT-2's published numbers are no target: the numeric scorecard is empty
    (the structural claims of `ioi.claims` are judged there instead)."""
    card = scorecard.scorecard(FakeStudy("smollm2-135m"), CLAIMS)
    assert len(card) == 0 and "verdict" in card.columns


def test_scorecard_table_is_a_markdown_pipe_table():
    """The printed scorecard is a pipe table with one row per claim and the CI as text."""
    text = scorecard.scorecard_table(scorecard.scorecard(FakeStudy(), CLAIMS))._repr_markdown_()
    lines = text.splitlines()
    assert lines[0].startswith("| Claim |") and len(lines) == 2 + len(CLAIMS)
    assert "[3.30, 3.80]" in text


def test_residual_handover_is_where_end_leads_for_good():
    """The handover layer: END leads every later layer; a negative S2 column cannot fire it early
    (END > S2 at layer 0 here, but IO leads there)."""
    from ioi.claims import handover_layer

    rows = [(0, "IO", 0.7), (0, "S2", -0.3), (0, "END", 0.0), (1, "IO", 0.6), (1, "S2", -0.2), (1, "END", 0.3),
            (2, "IO", 0.1), (2, "S2", 0.0), (2, "END", 0.8), (3, "IO", 0.0), (3, "S2", 0.0), (3, "END", 1.0)]
    frame = pd.DataFrame(rows, columns=["layer", "position", "patched_metric"])
    assert handover_layer(frame) == 2
    assert handover_layer(frame[frame.layer < 2]) is None
    assert scorecard.MEASURES["residual.end_overtakes_s2"](type("S", (), {"residual_patching": lambda self: frame})(), "").value == 2.0


def test_numbers_for_prose_use_true_minus_signs():
    """Prose numbers are rounded, signed with U+2212, and display as Markdown."""
    assert text.fmt(-1.904) == "−1.90"
    assert text.fmt(3) == "3"
    assert text.pct(0.873) == "87%"
    assert text.ci(0.1, -0.2) == "[0.10, −0.20]"
    assert text.fmt(float("nan")) == "n/a" and text.pct(float("nan")) == "n/a"
    assert text.fmt(2.0)._repr_markdown_() == "2.00"


def test_counts_in_prose_agree_in_number():
    """A printed count takes the singular for one and the plural otherwise ('1 name movers' was
    printed before), for a plain noun, a class of heads and a list of classes."""
    import numpy as np

    from ioi.circuits.criteria import Circuit

    assert text.count(1, "name mover") == "1 name mover" and text.count(2, "name mover") == "2 name movers"
    assert text.count(0, "head") == "0 heads" and text.count(np.int64(1), "head") == "1 head"
    assert text.count(3, "class") == "3 classes" and text.count(1200, "prompt") == "1,200 prompts"
    assert text.count(2, "mouse", "mice") == "2 mice"
    assert text.class_count(1, "induction") == "1 induction head" and text.class_count(2, "duplicate token") == "2 duplicate-token heads"
    assert text.class_count(1, "negative name mover") == "1 negative name mover"
    circuit = Circuit({"name mover": ((9, 9),), "induction": ((5, 5), (6, 9))}, {"name mover": "END", "induction": "S2"})
    assert text.class_sizes(circuit) == "1 name mover and 2 induction heads"
    table = pd.DataFrame({"kept": [True, True, False], "check": [False, True, False]})
    assert text.check_text(table).startswith("1 of them fails its class's")
    assert text.check_text(table.assign(check=False)).startswith("2 of them fail their class's")
    assert text.circuit_origin(circuit, None, None) == "the paper's 3 heads"
    from ioi.circuits.paths_discovery import PathsConfig

    origin = text.circuit_origin(circuit, table, PathsConfig())
    assert "by path patching: 3 heads, each kept" in origin and origin.endswith("1 of them fails its class's attention or copy-score check and is kept but flagged")


def test_output_format_reads_quarto_execute_info(tmp_path, monkeypatch):
    """The target comes from format.pandoc.to in the file QUARTO_EXECUTE_INFO names."""
    info = tmp_path / "info.json"
    info.write_text('{"format": {"pandoc": {"to": "typst"}}}')
    monkeypatch.setenv("QUARTO_EXECUTE_INFO", str(info))
    assert figures.output_format() == "typst" and not figures.is_html()
    info.write_text('{"format": {"pandoc": {"to": "html5+smart"}}}')
    assert figures.output_format() == "html5" and figures.is_html()


# --- Sentences that follow verdicts -----------------------------------------------------------


def test_counts_agree_with_their_noun():
    from ioi.report.text import Count, count

    assert count(1, "name mover") == "1 name mover" and count(2, "name mover") == "2 name movers"
    assert f"{Count(1):head}" == "1 head" and f"{Count(3):sender}" == "3 senders" and f"{Count(3)}" == "3"


def test_verdict_groups_say_how_each_claim_came_out():
    frame = pd.DataFrame({"claim_id": ["a", "b", "c", "d"], "short": ["A", "B", "C", "D"],
                          "verdict": ["reproduced", "partly", "reproduced", "not reproduced"]})
    said = text.verdict_groups(frame, ["a", "b", "c"])
    assert said == "2 of 3 as the paper reports (A and C) and 1 only partly (B)"
    assert text.verdict_groups(frame, ["d"]) == "1 of 1 not at all (D)"
    assert text.verdict_groups(frame, ["z"]) == "none was tested"


def test_size_trend_text_follows_the_computed_change():
    """The sentence names each measure's change as `size_trend` computed it, with both values."""
    sweep = pd.DataFrame([
        {"model": "s", "measure": "logit_diff", "value": 3.0, "ci_low": 2.8, "ci_high": 3.2, "unit": "logit", "verdict": ""},
        {"model": "l", "measure": "logit_diff", "value": 4.0, "ci_low": 3.7, "ci_high": 4.3, "unit": "logit", "verdict": ""},
        {"model": "s", "measure": "name_movers", "value": 1 / 3, "ci_low": np.nan, "ci_high": np.nan, "unit": "share", "verdict": "partly"},
        {"model": "l", "measure": "name_movers", "value": 1 / 3, "ci_low": np.nan, "ci_high": np.nan, "unit": "share", "verdict": "partly"},
    ])
    trend = pd.DataFrame([{"measure": "logit_diff", "small": "s", "large": "l", "change": "rises"},
                          {"measure": "name_movers", "small": "s", "large": "l", "change": "same verdict"}])
    said = text.size_trend_text(trend, sweep)
    assert "the logit difference rises (3.00 [2.80, 3.20] → 4.00 [3.70, 4.30])" in said
    assert "the top writers that are name movers 33% → 33% (same verdict: partly)" in said
    assert text.size_trend_text(trend.iloc[:0], sweep).startswith("with fewer than two sizes")


def test_numbers_never_print_a_negative_zero():
    assert text.fmt(-0.001) == "0.00" and text.fmt(-1.5) == "−1.50"
    assert text.pct(-0.001) == "0%" and text.pct(-0.2) == "−20%" and text.pct(-0.0004, 1) == "0.0%"
