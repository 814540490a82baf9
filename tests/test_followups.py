"""Follow-up experiments: the size sweep runs what it can and skips the rest with a reason;
the template sweep covers every template and agrees with `ioi.circuits.criteria`; the CLI's JSON rows.

The sweeps take model names, so the tiny random GPT-2 is saved as a local Hugging Face
directory (`tiny_dir`, a name `load_model` accepts); the hub models are made unreachable with
HF_HUB_OFFLINE=1, which makes `load_model` refuse them at once."""

import json

import numpy as np
import pandas as pd
import pytest

from ioi.circuits import criteria
from ioi import claims, followups
from ioi.report import text
from ioi.cli import main
from ioi.dataset import load_distribution
from ioi.study import Study, StudyConfig

N_TEMPLATES = 2 * len(load_distribution().baba_templates)


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- Follow-up 1: size --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def size_rows(tiny_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return followups.size_sweep([tiny_dir, "gpt2-medium"], n=8)


def test_size_sweep_runs_available_models_and_skips_the_rest(size_rows, tiny_dir):
    """Rows per model in the order given: the tiny model measured, gpt2-medium skipped with the
    reason and its published size and family, so it keeps its place on the figure."""
    assert list(dict.fromkeys(size_rows.model)) == [tiny_dir, "gpt2-medium"]
    skipped = size_rows[size_rows.model == "gpt2-medium"]
    assert len(skipped) == 1 and skipped.status.item() == "skipped" and "gpt2-medium" in skipped.reason.item()
    assert skipped.n_params.item() == 355e6 and skipped.family.item() == "GPT-2"
    assert text.skip_reasons(skipped) == "is not in the local Hugging Face cache and the hub cannot be reached"


def test_size_rows_are_the_claims_with_their_intervals(size_rows, tiny_dir):
    """The measured model has one row per measure (its logit difference, then each size claim),
    each with a verdict from the claims' vocabulary and its CI around its value."""
    rows = size_rows[size_rows.model == tiny_dir]
    assert list(rows.measure) == ["logit_diff", *followups.SIZE_CLAIMS]
    assert (rows.status == "ok").all() and (rows.n_layers == 3).all() and (rows.seconds > 0).all()
    assert set(rows.verdict[1:]) <= set(claims.VERDICTS) and rows.verdict.iloc[0] == ""
    bounded = rows.dropna(subset=["ci_low", "ci_high"])
    assert len(bounded) >= 2
    assert ((bounded.ci_low <= bounded.value + 1e-9) & (bounded.value <= bounded.ci_high + 1e-9)).all()


def test_unknown_model_name_fails_before_anything_runs():
    """A typo in --models is an error at once, not a skipped row after an hour of work."""
    with pytest.raises(ValueError, match="Unknown model"):
        followups.size_sweep(["gpt2-small-random", "gpt2-smal"])


def test_size_trend_compares_the_extremes_of_a_family():
    """Disjoint intervals: rises or falls; overlapping: no clear change; no intervals: verdicts."""
    def row(model, n_params, measure, value, low, high, verdict=""):
        return {"model": model, "family": "F", "n_params": n_params, "status": "ok", "measure": measure,
                "value": value, "ci_low": low, "ci_high": high, "verdict": verdict}

    frame = pd.DataFrame([
        row("small", 1e8, "logit_diff", 3.0, 2.8, 3.2), row("big", 1e9, "logit_diff", 4.0, 3.7, 4.3),
        row("small", 1e8, "backup", 0.6, 0.4, 0.8, "partly"), row("big", 1e9, "backup", 0.5, 0.3, 0.7, "partly"),
        row("small", 1e8, "name_movers", 1 / 3, np.nan, np.nan, "partly"),
        row("big", 1e9, "name_movers", 1.0, np.nan, np.nan, "reproduced"),
        row("mid", 5e8, "logit_diff", 9.0, 8.0, 10.0),
    ])
    trend = followups.size_trend(frame, "F").set_index("measure")
    assert trend.change.to_dict() == {"logit_diff": "rises", "backup": "no clear change", "name_movers": "verdict changes"}
    assert (trend.small == "small").all() and (trend.large == "big").all()
    assert followups.size_trend(frame, "G").empty


# --- Follow-up 2: template ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_study(tiny_dir):
    return Study(StudyConfig(model=tiny_dir, n=3 * N_TEMPLATES, templates="full"))


def test_template_rows_cover_every_template(tiny_dir):
    """One template row per template of the full set, with the requested prompts each; the
    models of the studies in `release_first` are let go first."""
    import weakref

    other = Study(StudyConfig(model=tiny_dir, n=4))
    held = weakref.ref(other.model)
    sweep = followups.template_sweep(Study(StudyConfig(model=tiny_dir, n=8)), n_per_template=2, release_first=(other, None))
    assert held() is None
    per_template = sweep[sweep.level == "template"]
    assert sorted(per_template.template_id) == list(range(N_TEMPLATES))
    assert (per_template.n == 2).all()
    assert set(per_template.order) == {"ABBA", "BABA"}
    assert list(sweep[sweep.level != "template"].order) == ["ABBA", "BABA", "ABBA-BABA"]


def test_whole_model_is_fully_faithful_on_every_template(tiny_study):
    """Ablating nothing leaves every prompt's logit difference as it was: faithfulness 1."""
    whole = criteria.whole_model(tiny_study.model)
    per_prompt = followups.prompt_faithfulness(tiny_study, whole)
    rows = pd.DataFrame(followups.template_rows(per_prompt) + followups.order_rows(per_prompt))
    np.testing.assert_allclose(rows[rows.level != "difference"].faithfulness, 1.0, rtol=1e-4)
    np.testing.assert_allclose(rows[rows.level == "difference"].faithfulness, 0.0, atol=1e-4)


def test_template_rows_agree_with_circuit_faithfulness_by_template(tiny_study):
    """The per-template rows are the numbers `ioi.circuits.criteria.faithfulness_by_template` gives, for
    a circuit that ablates most of the model."""
    partial = criteria.Circuit({"some": ((0, 1), (2, 3))}, {"some": "ALL"})
    ours = pd.DataFrame(followups.template_rows(followups.prompt_faithfulness(tiny_study, partial)))
    reference = criteria.faithfulness_by_template(tiny_study.model, partial, tiny_study.clean, tiny_study.corrupted)
    for column in ("n", "logit_diff_mean", "faithfulness", "faithfulness_ci_low", "logit_diff_ci_high"):
        np.testing.assert_allclose(ours[column], reference[column], rtol=1e-5, err_msg=column)


def test_order_difference_recovers_a_known_split():
    """Prompts built so that ABBA keeps half of F(M) and BABA all of it: the difference is
    -0.5 and its bootstrap interval holds -0.5 and excludes 0."""
    rng = np.random.default_rng(0)
    f_m = rng.uniform(1, 3, size=80)
    order = np.array(["ABBA", "BABA"] * 40)
    f_c = np.where(order == "ABBA", 0.5, 1.0) * f_m * rng.uniform(0.9, 1.1, size=80)
    per_prompt = pd.DataFrame({"template_id": np.arange(80) % 2, "order": order, "F_C": f_c, "F_M": f_m})
    diff = followups.order_rows(per_prompt)[-1]
    assert diff["order"] == "ABBA-BABA"
    assert diff["faithfulness_ci_low"] < -0.5 < diff["faithfulness_ci_high"] < 0
    assert diff["faithfulness"] == pytest.approx(-0.5, abs=0.05)


# --- Command line -------------------------------------------------------------------------------


def test_cli_size_json_reports_skipped_models(capsys):
    """`followup size --json` prints a JSON list whose skipped rows carry model, status, reason."""
    assert main(["followup", "size", "--models", "gpt2-medium,gpt2-xl", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["gpt2-medium", "gpt2-xl"]
    for row in rows:
        assert row["status"] == "skipped"
        assert row["reason"] and "Hugging Face" in row["reason"]
        assert row["n_params"] in (355e6, 1558e6)


def test_cli_templates_json_has_the_contracted_columns(capsys, tiny_dir):
    """`followup templates --json` prints one row per template with order, logit difference,
    faithfulness and their CIs, then the pooled and difference rows."""
    assert main(["followup", "templates", "--model", tiny_dir, "--n", "2", "--circuit-n", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    templates = [r for r in rows if r["level"] == "template"]
    assert len(templates) == N_TEMPLATES
    keys = {"template_id", "order", "n", "logit_diff_mean", "logit_diff_ci_low", "logit_diff_ci_high",
            "faithfulness", "faithfulness_ci_low", "faithfulness_ci_high"}
    assert all(keys <= set(r) for r in rows)
    assert {r["order"] for r in templates} == {"ABBA", "BABA"}
    assert [r["template_id"] for r in rows if r["level"] != "template"] == [None, None, None]


# --- The second family ---------------------------------------------------------------------------


def test_the_second_study_loads_after_the_main_model_is_let_go(tiny_dir, tmp_path, monkeypatch):
    """Building the second family's study first lets the main study's model go (two models'
    load peaks never stack); the main study loads it again when it next needs it."""
    import shutil
    import weakref

    monkeypatch.setenv("IOI_NO_CACHE", "1")  # so that building the second study loads its model
    main = Study(StudyConfig(model=tiny_dir, n=4))
    held = weakref.ref(main.model)
    other = str(shutil.copytree(tiny_dir, tmp_path / "another-model"))
    second, error = followups.second_study(other, main, n=4, n_path=4)
    assert error is None and second.config.model == other and second.config.n_path == 4
    assert held() is None  # nothing else kept it
    assert main.model is not None
    assert followups.second_study(tiny_dir, main, n=4, n_path=4) == (None, None)  # never the main model again
