"""The claims: the committed rules are the ones these tests expect, each predicate reaches each of
its verdicts on hand-made tables (and says "not reproduced" where the finding is absent), the
rules file matches the predicates, and a study's claims table fills every sentence."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from ioi import claims as C
from ioi import claims_table as T
from ioi.circuits import classes
from ioi.circuits.paths_discovery import PathsConfig
from ioi.weights import gpt2_tokenizer_directory
from ioi.report import scorecard
from ioi.study import Study, StudyConfig

# The committed thresholds. Changing one in data/claims.json or data/head_classes.json without
# changing it here fails `test_committed_thresholds_are_the_tested_ones`: a rule change is a
# visible, reviewed change (and goes into data/claims_history.csv).
PINNED = {
    "behaviour": {"reproduced_low": 0.9, "partly_mean": 0.75},
    "direct_writers": {"top_share": 0.05, "min_carried": 0.5, "min_late": 0.8, "late_depth": 0.6667},
    "name_movers": {"k": 3, "paper_copy": 0.95},
    "negative_name_movers": {"min_share": 0.137, "paper_copy": 0.95},
    "s_inhibition": {"min_fall": 0.5},
    "induction_duplicate": {},
    "previous_token": {},
    "backup": {"min_recovered": 0.5, "min_rise": 0.05},
    "residual_flow": {"depth": 0.73, "tolerance": 0.2, "min_signal": 0.2},
    "faithfulness": {"max_gap": 0.2, "max_gap_ci": 0.3, "partly_gap": 0.5},
    "completeness": {"max_incompleteness": 0.2, "paper_greedy": 0.87},
    "minimality": {"min_change": 0.01},
    "small_circuit": {"max_share": 0.2, "partly_share": 0.4},
    "adversarial": {"min_fall": 0.33},
    "position_token": {"min_position": 0.325, "min_token": 0.14},
    "mlp_knockout": {"min_fall": 0.655},
}
PINNED_CLASSES = classes.ClassRules(attention_margin=0.1, copy_score=0.575, random_token_score=0.3,
                                    random_length=25, random_n=50)
TH = {c["id"]: c["thresholds"] for c in T.load_claims()}
RULES = classes.load_rules()


def test_committed_thresholds_are_the_tested_ones():
    """The claims' thresholds, the class definitions and the discovery's path shares (which three
    rules and the circuit's classes use) are the ones these tests expect."""
    assert TH == PINNED
    assert RULES == PINNED_CLASSES
    assert StudyConfig().paths == PathsConfig(logits_share=0.05, queries_share=0.05, values_share=0.02, keys_share=0.02)


# --- Hand-made tables ------------------------------------------------------------------------------


SCORE_COLUMNS = ["layer", "head", "previous_token", "duplicate_token", "induction", "end_to_io", "end_to_s",
                 "copy_score", "negative_copy_score", "previous_token_random", "duplicate_token_random",
                 "induction_random"]
MOVER = dict(end_to_io=0.6, end_to_s=0.1, copy_score=0.97)
WEAK_MOVER = dict(end_to_io=0.6, end_to_s=0.1, copy_score=0.7)  # a name mover, below the paper's 95%
NEGATIVE = dict(end_to_io=0.5, end_to_s=0.1, negative_copy_score=0.97)


def scores(**by_head):
    """Head scores, zero except where given: scores(**{"3.1": dict(end_to_io=0.6)})."""
    rows = []
    for name, values in by_head.items():
        layer, head = map(int, name.split("."))
        rows.append(dict.fromkeys(SCORE_COLUMNS, 0.0) | {"layer": layer, "head": head} | values)
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def summary(mean, low, high):
    return pd.DataFrame([{"metric": "io_beats_s", "mean": mean, "ci_low": low, "ci_high": high, "n": 100}])


def dla(rows, width=0.1):
    """Mean DLA per head with a CI: dla({"9.9": 2.0})."""
    out = []
    for name, v in rows.items():
        layer, head = map(int, name.split("."))
        out.append({"layer": layer, "head": head, "mean": v, "ci_low": v - width, "ci_high": v + width, "n": 50})
    return pd.DataFrame(out)


def per_prompt(dla_by_head: dict, n_prompts=30, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"prompt_index": p, "layer": l, "head": h, "dla": v + noise * rng.standard_normal()}
            for p in range(n_prompts) for (l, h), v in dla_by_head.items()]
    return pd.DataFrame(rows)


def paths(rows):
    return pd.DataFrame([{"layer": int(n.split(".")[0]), "head": int(n.split(".")[1]), "logit_diff": 0.0,
                          "relative_change": -v} for n, v in rows.items()])


def noisy(mean, n=60, sd=0.05, seed=0):
    return mean + sd * np.random.default_rng(seed).standard_normal(n)


# --- One test per claim: every verdict, "not reproduced" where the finding is absent ---------------


def test_behaviour_verdicts():
    """IO > S: reproduced on the lower limit, partly on the mean, else not."""
    th = TH["behaviour"]
    assert C.behaviour(summary(0.97, 0.93, 1.0), **th).verdict == "reproduced"
    assert C.behaviour(summary(0.92, 0.85, 0.97), **th).verdict == "partly"
    assert C.behaviour(summary(0.6, 0.5, 0.7), **th).verdict == "not reproduced"


def test_direct_writers_verdicts():
    """A few late heads carrying most |DLA|: reproduced; concentrated but early: partly; spread
    evenly over early heads: not reproduced. The jackknife interval widens with noise."""
    th = TH["direct_writers"] | {"top_share": 0.1}
    base = {(l, h): 0.01 for l in range(10) for h in range(2)}  # 20 heads, top 10% = 2 heads
    late = C.direct_writers(per_prompt(base | {(9, 0): 3.0, (8, 1): -2.0}), 10, **th)
    assert late.verdict == "reproduced" and late.facts["heads"] == ["9.0", "8.1"] and late.value > 0.9
    noisier = C.direct_writers(per_prompt(base | {(9, 0): 3.0, (8, 1): -2.0}, noise=1.0), 10, **th)
    assert noisier.ci_high - noisier.ci_low > 5 * (late.ci_high - late.ci_low)
    early = C.direct_writers(per_prompt(base | {(1, 0): 3.0, (2, 1): -2.0}), 10, **th)
    assert early.verdict == "partly"
    spread = C.direct_writers(per_prompt({k: 1.0 for k in base}, noise=0.0), 10, **th)
    assert spread.verdict == "not reproduced" and spread.value == pytest.approx(0.1)


def test_name_mover_verdicts():
    """All top writers are name movers at the paper's copy score: reproduced; name movers below
    it, or only some: partly; none attends to IO and copies: not reproduced."""
    d = dla({"9.0": 3.0, "9.1": 2.0, "8.0": 1.0, "1.0": -0.5})
    th = TH["name_movers"]
    assert C.name_movers(d, scores(**{"9.0": MOVER, "9.1": MOVER, "8.0": MOVER}), RULES, **th).verdict == "reproduced"
    weaker = C.name_movers(d, scores(**{"9.0": MOVER, "9.1": WEAK_MOVER, "8.0": MOVER}), RULES, **th)
    assert weaker.verdict == "partly" and weaker.facts["passing"] == 3
    one = C.name_movers(d, scores(**{"9.0": MOVER, "9.1": dict(end_to_io=0.1, end_to_s=0.6, copy_score=0.97),
                                     "8.0": dict(end_to_io=0.6, end_to_s=0.1, copy_score=0.5)}), RULES, **th)
    assert one.verdict == "partly" and one.facts["passing"] == 1
    tie = dict(end_to_io=0.35, end_to_s=0.3, copy_score=0.97)  # attends IO, but within the margin
    assert C.name_movers(d, scores(**{"9.0": tie, "9.1": tie, "8.0": tie}), RULES, **th).verdict == "not reproduced"
    assert C.name_movers(dla({"1.0": -1.0}), scores(), RULES, **th).verdict == "not measured"


def test_negative_name_mover_verdicts():
    th = TH["negative_name_movers"]
    d = dla({"10.7": -1.0, "9.9": 2.0})  # -25% of a logit difference of 4
    found = C.negative_name_movers(d, scores(**{"10.7": NEGATIVE, "9.9": MOVER}), RULES, 4.0, **th)
    assert found.verdict == "reproduced" and found.value == pytest.approx(-0.25)
    assert found.facts["movers"] == ["10.7"] and found.facts["strongest"] == "10.7"
    two = C.negative_name_movers(dla({"10.7": -1.0, "11.10": -0.8, "9.9": 2.0}),
                                 scores(**{"10.7": NEGATIVE, "11.10": dict(end_to_io=0.5), "9.9": MOVER}), RULES, 4.0, **th)
    assert two.facts["heads"] == ["10.7", "11.10"] and two.facts["movers"] == ["10.7"]  # the sentence names only 10.7
    assert found.ci_low == pytest.approx(-0.275) and found.ci_high == pytest.approx(-0.225)
    no_copy = C.negative_name_movers(d, scores(**{"10.7": dict(end_to_io=0.5), "9.9": MOVER}), RULES, 4.0, **th)
    assert no_copy.verdict == "partly"
    uncertain = C.negative_name_movers(dla({"10.7": -0.6, "9.9": 2.0}, width=0.1), scores(**{"10.7": NEGATIVE, "9.9": MOVER}),
                                       RULES, 4.0, **th)  # -15%, but its upper limit -12.5% is above -13.7%
    assert uncertain.verdict == "not reproduced"
    assert C.negative_name_movers(dla({"10.7": -0.1, "9.9": 2.0}), scores(**{"10.7": NEGATIVE, "9.9": MOVER}),
                                  RULES, 4.0, **th).verdict == "not reproduced"
    assert C.negative_name_movers(d, scores(**{"10.7": NEGATIVE, "9.9": MOVER}), RULES, -1.0, **th).case == "no preference"


def attention(io_clean, s2_clean, io_patched, s2_patched, n=60):
    return pd.DataFrame({"prompt_index": range(n), "to_io_clean": noisy(io_clean, n, 0.02, 1),
                         "to_s2_clean": noisy(s2_clean, n, 0.02, 2), "to_io_patched": noisy(io_patched, n, 0.02, 3),
                         "to_s2_patched": noisy(s2_patched, n, 0.02, 4)})


def test_s_inhibition_verdicts():
    """The name movers' preference for IO falls by most of it: reproduced; by a little: partly;
    not at all, or no S-inhibition head found: not reproduced; no name movers: not measured."""
    th, senders = TH["s_inhibition"], ["7.3", "8.6"]
    gone = C.s_inhibition(attention(0.6, 0.1, 0.35, 0.35), senders, True, **th)
    assert gone.verdict == "reproduced" and gone.value == pytest.approx(1.0, abs=0.1)
    assert gone.ci_low <= gone.value <= gone.ci_high
    assert C.s_inhibition(attention(0.6, 0.1, 0.55, 0.15), senders, True, **th).verdict == "partly"
    assert C.s_inhibition(attention(0.6, 0.1, 0.6, 0.1), senders, True, **th).verdict == "not reproduced"
    none = C.s_inhibition(None, [], True, **th)
    assert none.verdict == "not reproduced" and none.case == "none found"
    assert C.s_inhibition(None, [], False, **th).verdict == "not measured"
    backwards = C.s_inhibition(attention(0.1, 0.3, 0.1, 0.3), senders, True, **th)
    assert backwards.verdict == "not reproduced" and backwards.case == "no preference to lose"


def test_induction_duplicate_verdicts():
    """Senders into the S-inhibition values, judged by repeated random tokens: most are induction
    or duplicate-token heads and both kinds occur: reproduced; some: partly; none: not."""
    p, share = paths({"5.5": 0.2, "0.1": 0.1, "3.0": 0.05, "6.1": 0.01}), 0.02
    ind, dup = dict(induction_random=0.6), dict(duplicate_token_random=0.5)
    both = C.induction_duplicate(p, scores(**{"5.5": ind, "0.1": dup, "3.0": dup}), RULES, share)
    assert both.verdict == "reproduced" and both.facts["k"] == 3 and both.facts["passing"] == 3
    one_kind = C.induction_duplicate(p, scores(**{"5.5": ind, "0.1": ind, "3.0": ind}), RULES, share)
    assert one_kind.verdict == "partly"
    # IOI-prompt scores do not count: only the random-token ones do
    ioi_only = scores(**{h: dict(induction=0.9, duplicate_token=0.9) for h in ("5.5", "0.1", "3.0")})
    assert C.induction_duplicate(p, ioi_only, RULES, share).verdict == "not reproduced"
    assert C.induction_duplicate(paths({"5.5": 0.01}), scores(**{"5.5": ind}), RULES, share).case == "none found"
    assert C.induction_duplicate(None, scores(), RULES, share).verdict == "not measured"


def test_previous_token_verdicts():
    p, share = paths({"2.2": 0.1, "4.11": 0.05}), 0.02
    prev = dict(previous_token_random=0.8)
    assert C.previous_token(p, scores(**{"2.2": prev, "4.11": prev}), RULES, share).verdict == "reproduced"
    assert C.previous_token(p, scores(**{"2.2": prev, "4.11": dict(previous_token_random=0.2)}), RULES, share).verdict == "partly"
    assert C.previous_token(p, scores(**{"2.2": {}, "4.11": {}}), RULES, share).verdict == "not reproduced"
    assert C.previous_token(None, scores(), RULES, share).verdict == "not measured"


def backup_tables(recovered, lost=4.0, n=40, riser=("9.0", 0.8), riser_scores=MOVER, seed=0):
    rng = np.random.default_rng(seed)
    before = 3.0 + 0.1 * rng.standard_normal(n)
    lost_p = lost + 0.1 * rng.standard_normal(n)
    rec = recovered * lost + 0.1 * rng.standard_normal(n)
    per_prompt = pd.DataFrame({"prompt_index": range(n), "logit_diff_before": before,
                               "logit_diff_after": before - lost_p + rec, "lost": lost_p,
                               "recovered_by_heads": rec, "recovered_by_rest": 0.0})
    per_prompt.attrs["heads"] = ["9.9", "9.6"]
    layer, head = map(int, riser[0].split("."))
    rises = pd.DataFrame([{"layer": layer, "head": head, "before": 0.1, "after": 0.1 + riser[1], "rise": riser[1],
                           "rise_ci_low": riser[1] - 0.1, "rise_ci_high": riser[1] + 0.1}])
    return per_prompt, rises, scores(**{riser[0]: riser_scores})


def test_backup_verdicts():
    """Other heads recover most of the lost direct effect, one of them a name mover: reproduced;
    some of it, or most without a backup name mover: partly; none: not reproduced."""
    th = TH["backup"]
    repaired = C.backup(*backup_tables(0.9), RULES, 3.0, **th)
    assert repaired.verdict == "reproduced" and repaired.value == pytest.approx(0.9, abs=0.02)
    assert repaired.facts["backup_movers"] == ["9.0"]
    assert repaired.ci_low <= repaired.value <= repaired.ci_high
    no_mover = C.backup(*backup_tables(0.9, riser_scores=dict(end_to_io=0.1, end_to_s=0.5)), RULES, 3.0, **th)
    assert no_mover.verdict == "partly" and no_mover.facts["backup_movers"] == []
    assert C.backup(*backup_tables(0.2), RULES, 3.0, **th).verdict == "partly"
    assert C.backup(*backup_tables(0.0), RULES, 3.0, **th).verdict == "not reproduced"
    assert C.backup(None, None, scores(), RULES, 3.0, **th).verdict == "not measured"
    riser_too_small = C.backup(*backup_tables(0.9, riser=("9.0", 0.1)), RULES, 3.0, **th)  # 3% of 3.0
    assert riser_too_small.verdict == "partly" and riser_too_small.facts["backup"] == []
    unsure = backup_tables(0.9)
    unsure[1]["rise_ci_low"] = -0.1  # rises, but its interval includes no rise
    assert C.backup(*unsure, RULES, 3.0, **th).facts["backup"] == []
    nothing_lost = C.backup(*backup_tables(0.0, lost=-0.5), RULES, 3.0, **th)
    assert nothing_lost.verdict == "not measured" and nothing_lost.case == "no loss"
    assert C.backup(*backup_tables(0.9), RULES, -1.0, **th).case == "no preference"


def residual(table: dict):
    """table: position -> list of restored values per layer."""
    return pd.DataFrame([{"layer": l, "position": p, "patched_metric": v}
                         for p, values in table.items() for l, v in enumerate(values)])


def test_residual_flow_verdicts_and_negative_columns():
    """S2 leads, then END from layer 8 of 12: reproduced. A negative S2 column cannot make END
    'lead' from layer 0 by comparison with it alone. IO leading before the handover is not the
    paper's S2: partly; a handover outside the window: partly; END from the start: not."""
    th = TH["residual_flow"]
    zeros = [0.0] * 12
    paper = residual({"IO": zeros, "S1": zeros, "S2": [0.9] * 8 + [0.1] * 4, "END": [0.0] * 8 + [1.0] * 4})
    found = C.residual_flow(paper, 12, **th)
    assert found.verdict == "reproduced" and found.facts == {"layer": 8, "carrier": "S2"}
    assert found.value == pytest.approx(8 / 11)
    io_first = residual({"IO": [0.5] * 8 + [0.0] * 4, "S1": zeros, "S2": [-0.4] * 12, "END": [0.1] * 8 + [1.0] * 4})
    io_found = C.residual_flow(io_first, 12, **th)
    assert io_found.facts["layer"] == 8 and io_found.verdict == "partly"  # not 0: END > S2 there, but IO leads
    early = residual({"IO": zeros, "S1": zeros, "S2": [0.9] * 3 + [0.0] * 9, "END": [0.0] * 3 + [1.0] * 9})
    assert C.residual_flow(early, 12, **th).verdict == "partly"  # S2, but handing over at depth 0.27
    at_once = residual({"IO": zeros, "S1": zeros, "S2": zeros, "END": [1.0] * 12})
    assert C.residual_flow(at_once, 12, **th).verdict == "not reproduced"
    faint = residual({"IO": zeros, "S1": zeros, "S2": [0.1] * 8 + [0.0] * 4, "END": [0.0] * 8 + [1.0] * 4})
    assert C.residual_flow(faint, 12, **th).verdict == "partly"  # S2 leads, but restores under min_signal


def test_faithfulness_verdicts():
    th = TH["faithfulness"]
    f = lambda x, w=0.05: {"faithfulness": x, "faithfulness_ci_low": x - w, "faithfulness_ci_high": x + w}  # noqa: E731
    assert C.faithfulness(26, f(0.87), **th).verdict == "reproduced"
    assert C.faithfulness(26, f(0.87, w=0.5), **th).verdict == "partly"  # too uncertain to count
    assert C.faithfulness(26, f(0.6), **th).verdict == "partly"
    assert C.faithfulness(26, f(0.3), **th).verdict == "not reproduced"
    # overshooting the model is as unfaithful as falling short (the paper's |F(M) - F(C)|)
    assert C.faithfulness(26, f(1.1), **th).verdict == "reproduced"
    assert C.faithfulness(26, f(1.15, w=0.2), **th).verdict == "partly"  # its interval reaches 1.35
    assert C.faithfulness(26, f(1.4), **th).verdict == "partly"
    assert C.faithfulness(26, f(1.6), **th).verdict == "not reproduced"
    assert C.faithfulness(0, {}, **th).verdict == "not measured"


def completeness_table(worst, greedy, f_m=3.5):
    return pd.DataFrame([
        {"subset": "empty", "K": "", "F_C_minus_K": 3.0, "F_M_minus_K": f_m, "incompleteness": 0.5},
        {"subset": "class: name mover", "K": "9.9", "F_C_minus_K": 1.0, "F_M_minus_K": 1.0 + worst * f_m,
         "incompleteness": worst * f_m},
        {"subset": "random 0", "K": "9.9", "F_C_minus_K": 1.0, "F_M_minus_K": 1.1, "incompleteness": 0.1},
        {"subset": "greedy", "K": "9.9", "F_C_minus_K": 1.0, "F_M_minus_K": 1.0, "incompleteness": greedy * f_m},
    ])


def test_completeness_verdicts():
    """The empty K's own gap (faithfulness's business) does not count; class-wise and random K do."""
    th = TH["completeness"]
    ok = C.completeness(completeness_table(0.1, 0.5), **th)
    assert ok.verdict == "reproduced" and ok.value == pytest.approx(0.1)
    assert C.completeness(completeness_table(0.4, 0.5), **th).verdict == "partly"
    assert C.completeness(completeness_table(0.1, 0.95), **th).verdict == "partly"
    assert C.completeness(completeness_table(0.4, 0.95), **th).verdict == "not reproduced"
    no_greedy = C.completeness(completeness_table(0.1, 0.5).query("subset != 'greedy'"), **th)
    assert no_greedy.verdict == "not measured" and no_greedy.case == "no greedy"
    assert C.completeness(None, **th).verdict == "not measured"


def test_minimality_verdicts():
    th = TH["minimality"]
    table = lambda changes: pd.DataFrame({"relative_change": changes})  # noqa: E731
    assert C.minimality(table([0.2, 0.05, 0.011]), **th).verdict == "reproduced"
    assert C.minimality(table([0.2, 0.05, 0.005]), **th).verdict == "partly"
    assert C.minimality(table([0.2, 0.005, 0.001]), **th).verdict == "not reproduced"


def test_small_circuit_verdicts():
    th = TH["small_circuit"]
    table = lambda k, n=144: pd.DataFrame({"in_circuit": [True] * k + [False] * (n - k), "method": "attribution patching"})  # noqa: E731
    found = C.small_circuit(table(26), 144, **th)
    assert found.verdict == "reproduced" and found.facts == {"k": 26, "method": "attribution patching"}
    assert C.small_circuit(table(50), 144, **th).verdict == "partly"
    assert C.small_circuit(table(100), 144, **th).verdict == "not reproduced"
    assert C.small_circuit(None, 144, **th).verdict == "not measured"


def test_adversarial_verdicts():
    """The paper's fall (3.55 -> 1.23): reproduced; a small fall: partly; none: not."""
    th = TH["adversarial"]
    frame = lambda after: pd.DataFrame({"logit_diff": noisy(3.55), "logit_diff_extra_io": noisy(after, seed=1),  # noqa: E731
                                        "io_beats_s_extra_io": True})
    paper = C.adversarial(frame(1.23), **th)
    assert paper.verdict == "reproduced" and paper.value == pytest.approx(1 - 1.23 / 3.55, abs=0.02)
    assert C.adversarial(frame(3.0), **th).verdict == "partly"
    assert C.adversarial(frame(3.6), **th).verdict == "not reproduced"
    backwards = pd.DataFrame({"logit_diff": noisy(-1.0), "logit_diff_extra_io": noisy(-3.0), "io_beats_s_extra_io": False})
    assert C.adversarial(backwards, **th).case == "no preference"  # a "fall" from a negative mean reads backwards


def test_position_token_verdicts():
    """The paper's 2.31 * position + 0.99 * token: reproduced; token over position, a position
    signal without a token signal, or a weak one: partly; neither: not reproduced."""
    th = TH["position_token"]
    frame = lambda a, b: pd.DataFrame({"a": noisy(a), "b": noisy(b, seed=1)})  # noqa: E731
    assert C.position_token(frame(2.31, 0.99), 3.55, **th).verdict == "reproduced"
    assert C.position_token(frame(0.99, 2.31), 3.55, **th).verdict == "partly"
    assert C.position_token(frame(2.83, 0.03), 5.6, **th).verdict == "partly"  # a token signal far under half the paper's
    assert C.position_token(frame(0.5, 0.2), 3.55, **th).verdict == "partly"  # positional, but weak
    assert C.position_token(frame(0.0, 0.0), 3.55, **th).verdict == "not reproduced"
    even = C.position_token(frame(1.6, 1.7), 3.55, **th)  # both at half the paper's size, token ahead
    assert even.verdict == "partly" and even.case == "token over position"
    assert C.position_token(frame(2.31, 0.99), -1.0, **th).case == "no preference"
    assert C.position_token(None, 3.55, **th).verdict == "not measured"


def test_mlp_knockout_verdicts():
    """The paper's 3.56 -> -1.1: reproduced; a modest fall: partly; none: not."""
    th = TH["mlp_knockout"]
    frame = lambda after: pd.DataFrame({"logit_diff": noisy(3.56), "knocked_out": noisy(after, seed=1)})  # noqa: E731
    assert C.mlp_knockout(frame(-1.1), **th).verdict == "reproduced"
    assert C.mlp_knockout(frame(2.5), **th).verdict == "partly"
    assert C.mlp_knockout(frame(3.6), **th).verdict == "not reproduced"
    assert C.mlp_knockout(pd.DataFrame({"logit_diff": noisy(-1.0), "knocked_out": noisy(0.0)}), **th).case == "no preference"


def hand_made_findings() -> dict[str, list]:
    """Findings from the hand-made tables above, at least one for every sentence of every claim."""
    d = dla({"9.0": 3.0, "9.1": 2.0, "8.0": 1.0, "1.0": -0.5})
    movers = scores(**{"9.0": MOVER, "9.1": MOVER, "8.0": MOVER})
    neg = dla({"10.7": -1.0, "9.9": 2.0})
    ind, dup, prev = dict(induction_random=0.6), dict(duplicate_token_random=0.5), dict(previous_token_random=0.8)
    p3 = paths({"5.5": 0.2, "0.1": 0.1, "3.0": 0.05})
    plain = scores(**dict.fromkeys(("5.5", "0.1", "3.0"), {}))  # attend to nothing in particular
    base = {(l, h): 0.01 for l in range(10) for h in range(2)}
    f = lambda x, w=0.05: {"faithfulness": x, "faithfulness_ci_low": x - w, "faithfulness_ci_high": x + w}  # noqa: E731
    mini = lambda changes: pd.DataFrame({"relative_change": changes})  # noqa: E731
    small = lambda k: pd.DataFrame({"in_circuit": [True] * k + [False] * (144 - k), "method": "attribution patching"})  # noqa: E731
    extra = lambda before, after: pd.DataFrame({"logit_diff": noisy(before), "logit_diff_extra_io": noisy(after, seed=1),  # noqa: E731
                                                "io_beats_s_extra_io": True})
    mlp = lambda before, after: pd.DataFrame({"logit_diff": noisy(before), "knocked_out": noisy(after, seed=1)})  # noqa: E731
    pos = lambda a, b: pd.DataFrame({"a": noisy(a), "b": noisy(b, seed=1)})  # noqa: E731
    zeros = [0.0] * 12
    th = TH
    return {
        "behaviour": [C.behaviour(summary(*v), **th["behaviour"]) for v in ((0.97, 0.93, 1.0), (0.92, 0.85, 0.97), (0.6, 0.5, 0.7))]
        + [C.NOT_MEASURED],
        "direct_writers": [C.direct_writers(per_prompt(base | w), 10, **th["direct_writers"] | {"top_share": 0.1})
                           for w in ({(9, 0): 3.0}, {(1, 0): 3.0}, {})] + [C.NOT_MEASURED],
        "name_movers": [C.name_movers(d, sc, RULES, **th["name_movers"]) for sc in (
            movers, scores(**{"9.0": MOVER, "9.1": WEAK_MOVER, "8.0": MOVER}), scores(**dict.fromkeys(("9.0", "9.1", "8.0"), {})))]
        + [C.name_movers(dla({"1.0": -1.0}), scores(), RULES, **th["name_movers"])],
        "negative_name_movers": [C.negative_name_movers(dd, sc, RULES, ld, **th["negative_name_movers"]) for dd, sc, ld in (
            (neg, scores(**{"10.7": NEGATIVE}), 4.0), (neg, scores(**{"10.7": dict(end_to_io=0.5)}), 4.0),
            (dla({"10.7": -0.1}), scores(**{"10.7": NEGATIVE}), 4.0), (neg, scores(**{"10.7": NEGATIVE}), -1.0))]
        + [C.NOT_MEASURED],
        "s_inhibition": [C.s_inhibition(attention(*v), ["7.3"], True, **th["s_inhibition"]) for v in (
            (0.6, 0.1, 0.35, 0.35), (0.6, 0.1, 0.55, 0.15), (0.6, 0.1, 0.6, 0.1), (0.1, 0.3, 0.1, 0.3))]
        + [C.s_inhibition(None, [], True, **th["s_inhibition"]), C.s_inhibition(None, [], False, **th["s_inhibition"])],
        "induction_duplicate": [C.induction_duplicate(pp, sc, RULES, 0.02) for pp, sc in (
            (p3, scores(**{"5.5": ind, "0.1": dup, "3.0": dup})), (p3, scores(**{"5.5": ind, "0.1": {}, "3.0": {}})), (p3, plain),
            (paths({"5.5": 0.01}), scores()), (None, scores()))],
        "previous_token": [C.previous_token(pp, sc, RULES, 0.02) for pp, sc in (
            (p3, scores(**{"5.5": prev, "0.1": prev})), (p3, scores(**{"5.5": prev, "0.1": {}, "3.0": {}})), (p3, plain),
            (paths({"5.5": 0.01}), scores()), (None, scores()))],
        "backup": [C.backup(*backup_tables(r, lost=lost), RULES, ld, **th["backup"]) for r, lost, ld in (
            (0.9, 4.0, 3.0), (0.2, 4.0, 3.0), (0.0, 4.0, 3.0), (0.0, -0.5, 3.0), (0.9, 4.0, -1.0))]
        + [C.backup(None, None, scores(), RULES, 3.0, **th["backup"])],
        "residual_flow": [C.residual_flow(residual(t), 12, **th["residual_flow"]) for t in (
            {"IO": zeros, "S2": [0.9] * 8 + [0.1] * 4, "END": [0.0] * 8 + [1.0] * 4},
            {"IO": [0.5] * 8 + [0.0] * 4, "S2": zeros, "END": [0.1] * 8 + [1.0] * 4},
            {"IO": zeros, "S2": [0.9] * 12, "END": [0.5] * 12})]
        + [C.NOT_MEASURED],
        "faithfulness": [C.faithfulness(26, f(x), **th["faithfulness"]) for x in (0.87, 0.6, 0.3)]
        + [C.faithfulness(0, {}, **th["faithfulness"])],
        "completeness": [C.completeness(t, **th["completeness"]) for t in (
            completeness_table(0.1, 0.5), completeness_table(0.4, 0.5), completeness_table(0.4, 0.95),
            completeness_table(0.1, 0.5).query("subset != 'greedy'"), None)],
        "minimality": [C.minimality(mini(v), **th["minimality"]) for v in ([0.2, 0.05], [0.2, 0.05, 0.005], [0.005])]
        + [C.minimality(None, **th["minimality"])],
        "small_circuit": [C.small_circuit(t, 144, **th["small_circuit"]) for t in (small(26), small(50), small(100), None)],
        "adversarial": [C.adversarial(extra(3.55, a), **th["adversarial"]) for a in (1.23, 3.0, 3.6)]
        + [C.adversarial(extra(-1.0, -3.0), **th["adversarial"]), C.adversarial(None, **th["adversarial"])],
        "position_token": [C.position_token(pos(a, b), ld, **th["position_token"]) for a, b, ld in (
            (2.31, 0.99, 3.55), (1.6, 1.7, 3.55), (0.5, 0.2, 3.55), (0.0, 0.0, 3.55), (2.31, 0.99, -1.0))]
        + [C.position_token(None, 3.55, **th["position_token"])],
        "mlp_knockout": [C.mlp_knockout(mlp(3.56, a), **th["mlp_knockout"]) for a in (-1.1, 2.5, 3.6)]
        + [C.mlp_knockout(mlp(-1.0, 0.0), **th["mlp_knockout"]), C.mlp_knockout(None, **th["mlp_knockout"])],
    }


def test_every_sentence_of_every_claim_formats_from_its_predicates_facts():
    """Each claim's every text (each verdict and each case, and the shared ones it can pick) is
    reached by a hand-made finding, and formats from the facts its predicate gives, with no brace
    left, no nan and no leaked None."""
    named = T.rule_values(StudyConfig().paths) | {"logit_diff": "−1.00"}
    shared = set(T.shared_texts())
    for spec in T.load_claims():
        reached = set()
        for finding in hand_made_findings()[spec["id"]]:
            row = T.claim_row(spec, finding, named)
            key = f"{finding.verdict}: {finding.case}" if finding.case else finding.verdict
            assert key in spec["text"] or key in shared, (spec["id"], key)
            reached.add(key)
            sentence = scorecard.claim_sentence(pd.Series(row))
            assert "{" not in sentence and not re.search(r"\bnan\b|\bNone\b", sentence), (spec["id"], sentence)
        assert set(spec["text"]) <= reached, (spec["id"], set(spec["text"]) - reached)


# --- The rules file, and a real (tiny) study ----------------------------------------------------------


def test_every_claim_has_a_predicate_a_rule_and_a_sentence_per_verdict():
    """The rules file and the predicates agree; each rule formats from its thresholds and the
    class definitions; no sentence can read as a leaked Python None."""
    specs = T.load_claims()
    assert len({c["id"] for c in specs}) == len(specs) == len(PINNED)
    named = T.rule_values(StudyConfig().paths)
    for spec in specs:
        assert set(C.VERDICTS) <= set(spec["text"]), spec["id"]
        assert {t.split(": ")[0] for t in spec["text"]} <= set(C.VERDICTS), spec["id"]
        spec["rule"].format(**named, **spec["thresholds"])
        for sentence in spec["text"].values():  # read as a leaked Python None by the render test
            assert not re.search(r"\bNone\b", sentence), (spec["id"], sentence)


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


def test_claims_on_a_tiny_study_fill_every_sentence(tiny_study):
    """Every claim gets a verdict on a real (tiny) study, and every sentence formats cleanly."""
    frame = T.claims(tiny_study)
    assert list(frame.claim_id) == [c["id"] for c in T.load_claims()]
    for claim_id, sentence in scorecard.claim_sentences(frame).items():
        assert "{" not in sentence and "nan" not in sentence.lower() and "np." not in sentence, (claim_id, sentence)
    table = scorecard.claims_table({"tiny": frame})._repr_markdown_()
    assert table.count("\n") == len(frame) + 1
    only = T.claims(tiny_study, only=["behaviour", "backup"])
    assert list(only.claim_id) == ["behaviour", "backup"]
    with pytest.raises(ValueError, match="No such claims"):
        T.claims(tiny_study, only=["behavior"])


def test_size_claims_do_not_find_the_whole_circuit(tiny_study, monkeypatch):
    """The size follow-up's claims need the name movers (the discovery's first step), never the
    whole circuit, whose later path-patching steps cost most of a large model's time."""
    from ioi import followups

    def refuse():
        raise AssertionError("the whole circuit was computed")

    monkeypatch.setattr(tiny_study, "circuit", refuse)
    assert list(T.claims(tiny_study, only=followups.SIZE_CLAIMS).claim_id) == list(followups.SIZE_CLAIMS)


def test_claims_cli_prints_one_json_row_per_claim(tiny_study_model, capsys):
    from ioi.cli import main

    assert main(["claims", "--model", tiny_study_model, "--n", "8", "--n-path", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["claim_id"] for r in rows] == [c["id"] for c in T.load_claims()]
    assert all(r["verdict"] in C.VERDICTS and r["sentence"] for r in rows)
