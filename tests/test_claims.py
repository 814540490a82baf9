"""The structural claims: each predicate reaches each of its verdicts on hand-made tables, the
rules file matches the predicates, and a study's claims table fills every sentence."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from ioi import claims as C
from ioi.models import gpt2_tokenizer_directory
from ioi.report import scorecard
from ioi.study import Study, StudyConfig


@pytest.fixture(scope="module")
def tiny_study_model(tmp_path_factory):
    """A 3-layer, 4-head random GPT-2 saved where `load_model` reads it by path."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64)).save_pretrained(directory)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_directory()).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_study(tiny_study_model):
    return Study(StudyConfig(model=tiny_study_model, n=8, n_path=4, top_heads=4))


def heads(rows, columns=("layer", "head")):
    return pd.DataFrame(rows, columns=list(columns))


SCORE_COLUMNS = ["layer", "head", "previous_token", "duplicate_token", "induction", "end_to_io", "end_to_s",
                 "copy_score", "negative_copy_score"]


def scores(**by_head):
    """Head scores, zero except where given: scores(**{"3.1": dict(end_to_io=0.6)})."""
    rows = []
    for name, values in by_head.items():
        layer, head = map(int, name.split("."))
        row = dict.fromkeys(SCORE_COLUMNS, 0.0) | {"layer": layer, "head": head} | values
        rows.append(row)
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def summary(mean, low, high):
    return pd.DataFrame([{"metric": "io_beats_s", "mean": mean, "ci_low": low, "ci_high": high, "n": 100}])


def test_behaviour_verdicts():
    """IO > S: reproduced on the lower limit, partly on the mean, else not."""
    th = {"reproduced_low": 0.9, "partly_mean": 0.75}
    assert C.behaviour(summary(0.97, 0.93, 1.0), **th).verdict == "reproduced"
    assert C.behaviour(summary(0.92, 0.85, 0.97), **th).verdict == "partly"
    assert C.behaviour(summary(0.6, 0.5, 0.7), **th).verdict == "not reproduced"


def per_prompt(dla_by_head: dict, n_prompts=30, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"prompt_index": p, "layer": l, "head": h, "dla": v + noise * rng.standard_normal()}
            for p in range(n_prompts) for (l, h), v in dla_by_head.items()]
    return pd.DataFrame(rows)


def test_direct_writers_verdicts():
    """A few late heads carrying most |DLA|: reproduced; concentrated but early: partly; spread
    evenly over early heads: not reproduced."""
    th = {"top_share": 0.1, "min_carried": 0.5, "min_late": 0.8, "late_depth": 0.6667}
    base = {(l, h): 0.01 for l in range(10) for h in range(2)}  # 20 heads, top 10% = 2 heads
    late = C.direct_writers(per_prompt(base | {(9, 0): 3.0, (8, 1): -2.0}), 10, **th)
    assert late.verdict == "reproduced" and late.facts["heads"] == ["9.0", "8.1"] and late.value > 0.9
    assert late.ci_low <= late.value <= late.ci_high
    early = C.direct_writers(per_prompt(base | {(1, 0): 3.0, (2, 1): -2.0}), 10, **th)
    assert early.verdict == "partly"
    spread = C.direct_writers(per_prompt({k: 1.0 for k in base}, noise=0.0), 10, **th)
    assert spread.verdict == "not reproduced" and spread.value == pytest.approx(0.1)


def dla(rows):
    """Mean DLA per head with a CI: dla({"9.9": 2.0})."""
    out = []
    for name, v in rows.items():
        layer, head = map(int, name.split("."))
        out.append({"layer": layer, "head": head, "mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 50})
    return pd.DataFrame(out)


def test_name_mover_verdicts():
    """All top heads attend IO over S2 and copy: reproduced; one does: partly; none: not."""
    d = dla({"9.0": 3.0, "9.1": 2.0, "8.0": 1.0, "1.0": -0.5})
    mover = dict(end_to_io=0.6, end_to_s=0.1, copy_score=0.9)
    th = {"k": 3, "min_copy": 0.5}
    all_ok = scores(**{"9.0": mover, "9.1": mover, "8.0": mover})
    assert C.name_movers(d, all_ok, **th).verdict == "reproduced"
    one = scores(**{"9.0": mover, "9.1": dict(end_to_io=0.1, end_to_s=0.6, copy_score=0.9), "8.0": dict(copy_score=0.1)})
    assert C.name_movers(d, one, **th).verdict == "partly"
    none = scores(**{"9.0": dict(copy_score=0.9), "9.1": dict(), "8.0": dict()})
    assert C.name_movers(d, none, **th).verdict == "not reproduced"
    assert C.name_movers(dla({"1.0": -1.0}), none, **th).verdict == "not measured"


def test_negative_name_mover_verdicts():
    th = {"min_share": 0.1, "min_copy": 0.5}
    d = dla({"10.7": -1.0, "9.9": 2.0})
    good = scores(**{"10.7": dict(end_to_io=0.5, end_to_s=0.1, negative_copy_score=0.8), "9.9": dict()})
    found = C.negative_name_movers(d, good, 4.0, **th)
    assert found.verdict == "reproduced" and found.value == pytest.approx(-0.25)
    assert C.negative_name_movers(d, scores(**{"10.7": dict(), "9.9": dict()}), 4.0, **th).verdict == "partly"
    weak = C.negative_name_movers(dla({"10.7": -0.1, "9.9": 2.0}), good, 4.0, **th)
    assert weak.verdict == "not reproduced"


def paths(rows):
    return pd.DataFrame([{"layer": int(n.split(".")[0]), "head": int(n.split(".")[1]), "logit_diff": 0.0,
                          "relative_change": v} for n, v in rows.items()])


def test_s_inhibition_verdicts():
    """Senders carrying the path must attend END->S2; no name movers means not measured."""
    p = paths({"7.3": -0.3, "8.6": -0.2, "5.0": -0.01})
    s2 = dict(end_to_s=0.5, end_to_io=0.1)
    assert C.s_inhibition(p, scores(**{"7.3": s2, "8.6": s2}), 0.05).verdict == "reproduced"
    partly = C.s_inhibition(p, scores(**{"7.3": s2, "8.6": dict(end_to_io=0.5)}), 0.05)
    assert partly.verdict == "partly" and partly.facts["passing"] == 1 and partly.facts["k"] == 2
    assert C.s_inhibition(p, scores(**{"7.3": dict(), "8.6": dict()}), 0.05).verdict == "not reproduced"
    assert C.s_inhibition(paths({"7.3": -0.01}), scores(**{"7.3": s2}), 0.05).verdict == "not reproduced"
    assert C.s_inhibition(None, scores(), 0.05).verdict == "not measured"


def test_induction_duplicate_verdicts():
    p = paths({"5.5": -0.2, "0.1": -0.1})
    th = {"min_effect": 0.05, "min_score": 0.1}
    assert C.induction_duplicate(p, scores(**{"5.5": dict(induction=0.5), "0.1": dict(duplicate_token=0.4)}), **th).verdict == "reproduced"
    assert C.induction_duplicate(p, scores(**{"5.5": dict(induction=0.5), "0.1": dict()}), **th).verdict == "partly"
    assert C.induction_duplicate(p, scores(**{"5.5": dict(), "0.1": dict()}), **th).verdict == "not reproduced"
    assert C.induction_duplicate(None, scores(), **th).verdict == "not measured"


def knockout(cost, nm_dla, n=40, seed=0):
    rng = np.random.default_rng(seed)
    f_m = 3.0 + 0.1 * rng.standard_normal(n)
    frame = pd.DataFrame({"F_M": f_m, "F_M_minus_NM": f_m - cost - 0.02 * rng.standard_normal(n),
                          "nm_dla": nm_dla + 0.05 * rng.standard_normal(n)})
    frame.attrs["heads"] = ["9.9", "9.6"]
    return frame


def test_backup_verdicts():
    """Knockout cost far below the direct effect: repaired; close to it: not."""
    th = {"max_ratio": 0.5, "partly_ratio": 0.8}
    repaired = C.backup(knockout(0.2, 4.0), **th)
    assert repaired.verdict == "reproduced" and repaired.value == pytest.approx(0.05, abs=0.02)
    assert repaired.ci_low <= repaired.value <= repaired.ci_high
    assert C.backup(knockout(2.6, 4.0), **th).verdict == "partly"
    assert C.backup(knockout(3.8, 4.0), **th).verdict == "not reproduced"
    assert C.backup(None, **th).verdict == "not measured"
    assert C.backup(knockout(0.2, -1.0), **th).verdict == "not measured"


def residual(table: dict):
    """table: position -> list of restored values per layer."""
    return pd.DataFrame([{"layer": l, "position": p, "patched_metric": v}
                         for p, values in table.items() for l, v in enumerate(values)])


def test_residual_flow_verdicts_and_negative_columns():
    """S2 leads, then END from layer 8 of 12: reproduced. A negative S2 column cannot make END
    'lead' from layer 0 by comparison with it alone; with names never leading, it is partly."""
    th = {"min_depth": 0.3, "max_depth": 0.95, "min_signal": 0.2}
    zeros = [0.0] * 12
    paper = residual({"IO": zeros, "S1": zeros, "S2": [0.9] * 8 + [0.1] * 4, "END": [0.0] * 8 + [1.0] * 4})
    found = C.residual_flow(paper, 12, **th)
    assert found.verdict == "reproduced" and found.facts == {"layer": 8, "carrier": "S2"}
    assert found.value == pytest.approx(8 / 11)
    negative = residual({"IO": [0.5] * 6 + [0.0] * 6, "S1": zeros, "S2": [-0.4] * 12, "END": [0.1] * 6 + [1.0] * 6})
    assert C.residual_flow(negative, 12, **th).facts["layer"] == 6  # not 0: END > S2 there, but IO leads
    not_names = residual({"IO": zeros, "S1+1": [0.3] * 6 + [0.0] * 6, "S2": [-0.4] * 12, "END": [0.05] * 6 + [1.0] * 6})
    assert C.residual_flow(not_names, 12, **th).verdict == "partly"  # handover mid-depth, but from S1+1
    at_once = residual({"IO": zeros, "S1": zeros, "S2": zeros, "END": [1.0] * 12})
    assert C.residual_flow(at_once, 12, **th).verdict == "not reproduced"


def test_small_circuit_verdicts():
    th = {"max_share": 0.2, "min_faithfulness": 0.8, "min_faithfulness_low": 0.7}
    f = lambda x, w=0.05: {"faithfulness": x, "faithfulness_ci_low": x - w, "faithfulness_ci_high": x + w}  # noqa: E731
    assert C.small_circuit(26, 144, f(0.87), **th).verdict == "reproduced"
    assert C.small_circuit(26, 144, f(0.87, w=0.5), **th).verdict == "partly"  # too uncertain to count
    assert C.small_circuit(142, 270, f(0.93), **th).verdict == "partly"
    assert C.small_circuit(142, 270, f(0.5), **th).verdict == "not reproduced"
    assert C.small_circuit(0, 270, f(0.5), **th).verdict == "not measured"


def test_every_claim_has_a_predicate_a_rule_and_a_sentence_per_verdict():
    """The rules file and the predicates agree; each text names only facts its claim provides."""
    specs = C.load_claims()
    assert len({c["id"] for c in specs}) == len(specs) >= 9
    for spec in specs:
        assert set(spec["text"]) == set(C.VERDICTS), spec["id"]
        spec["rule"].format(**spec["thresholds"])  # every placeholder of the rule is a threshold
        for sentence in spec["text"].values():  # read as a leaked Python None by the render test
            assert not re.search(r"\bNone\b", sentence), (spec["id"], sentence)


def test_claims_on_a_tiny_study_fill_every_sentence(tiny_study):
    """Every claim gets a verdict on a real (tiny) study, and every sentence formats cleanly."""
    frame = C.claims(tiny_study)
    assert list(frame.claim_id) == [c["id"] for c in C.load_claims()]
    assert set(frame.verdict) <= set(C.VERDICTS)
    for claim_id, sentence in scorecard.claim_sentences(frame).items():
        assert "{" not in sentence and "nan" not in sentence.lower() and "np." not in sentence, (claim_id, sentence)
    table = scorecard.claims_table(frame)._repr_markdown_()
    assert table.count("\n") == len(frame) + 1


def test_claims_cli_prints_one_json_row_per_claim(tiny_study_model, capsys):
    from ioi.cli import main

    assert main(["claims", "--model", tiny_study_model, "--n", "8", "--n-path", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["claim_id"] for r in rows] == [c["id"] for c in C.load_claims()]
    assert all(r["verdict"] in C.VERDICTS and r["sentence"] for r in rows)
