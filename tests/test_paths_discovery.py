"""The paper-way circuit discovery: each step sweeps the previous step's heads, keeps exactly the
senders over its threshold, checks classes by scores without reclassifying, and on a model whose
only writing heads are planted it finds exactly them."""

import pandas as pd
import pytest
import torch
from conftest import _seeded, make_pair
from transformers import GPT2Config, GPT2LMHeadModel

from ioi.analyses.head_scores import head_scores
from ioi.circuits import classes
from ioi.circuits import paths_discovery as P
from ioi.engines import fast_paths, hooks_paths
from ioi.models import from_hf_model
from ioi.weights import gpt2_tokenizer_directory

N_LAYERS, N_HEADS = 6, 2


def _scores(**per_head):
    """Scores for a 6 x 2 model: every score 0 unless given as {(layer, head): {score: value}}."""
    rows = []
    for l in range(N_LAYERS):
        for h in range(N_HEADS):
            row = {"layer": l, "head": h, **{c: 0.0 for c in P.SCORE_COLUMNS}}
            row.update(per_head.get(f"h{l}{h}", {}))
            rows.append(row)
    return pd.DataFrame(rows)


def _frame(last, effects):
    """A sweep frame over the heads before layer `last`, effects given as share of the logit
    difference carried (relative_change = -effect)."""
    rows = [{"layer": l, "head": h, "logit_diff": 0.0, "relative_change": -effects.get((l, h), 0.0)}
            for l in range(last) for h in range(N_HEADS)]
    return pd.DataFrame(rows)


class FakeSweep:
    """A planted set of path effects per step, recording which receivers each step asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, receivers, receiver_input, position, first_layer):
        self.calls.append((receivers, receiver_input, position, first_layer))
        if receivers == "logits":  # name movers 5.0 and 4.1, 4.0 (fails its check), negative 5.1, a sub-threshold 3.1
            return _frame(N_LAYERS, {(5, 0): 0.30, (5, 1): -0.10, (4, 1): 0.05, (4, 0): 0.06, (3, 1): 0.049})
        last = min(l for l, _ in receivers)
        effects = {
            "q": {(3, 0): 0.20, (2, 1): -0.3},  # a harmful path is not an S-inhibition head
            "v": {(2, 0): 0.05, (1, 1): 0.03, (1, 0): 0.019},
            "k": {(0, 0): 0.021},
        }[receiver_input]
        frame = _frame(last, effects)
        return frame[frame.layer >= first_layer]


MOVER = {"end_to_io": 0.6, "end_to_s": 0.1, "copy_score": 0.9}
SCORES = _scores(
    h50=MOVER, h41=MOVER,
    h51={"end_to_io": 0.5, "end_to_s": 0.1, "negative_copy_score": 0.8},
    h40={"end_to_io": 0.1, "end_to_s": 0.4, "copy_score": 0.9},  # fails the name-mover check
    h30={"end_to_s": 0.5, "end_to_io": 0.1},
    h20={"induction_random": 0.4, "duplicate_token_random": 0.2},
    h11={"induction_random": 0.05, "duplicate_token_random": 0.35},
    h00={"previous_token_random": 0.05},  # fails the previous-token check
)
RULES = classes.load_rules()
EVERY_HEAD_PASSES = classes.ClassRules(attention_margin=-1.0, copy_score=0.0, random_token_score=0.0,
                                       random_length=RULES.random_length, random_n=RULES.random_n)


def test_each_step_sweeps_the_previous_steps_heads_that_pass_their_check():
    """Step 2 patches the name movers' queries at END, step 3 the S-inhibition heads' values at
    S2, step 4 the induction heads' keys at S1+1 (not the duplicate-token heads'); a sender
    between two receivers' layers is patched into the later one only; a head that fails its
    class's check (4.0) receives nothing."""
    sweep = FakeSweep()
    P.paper_way_circuit(sweep, SCORES)
    assert sweep.calls == [
        ("logits", None, None, 0),
        (((4, 1), (5, 0)), "q", "END", 0),
        (((5, 0),), "q", "END", 4),
        (((3, 0),), "v", "S2", 0),
        (((2, 0),), "k", "S1+1", 0),
    ]


def test_later_steps_are_skipped_below_last_step():
    """`last_step` stops the discovery: its rows are the full table's first steps'."""
    full = P.paper_way_circuit(FakeSweep(), SCORES)
    sweep = FakeSweep()
    first = P.paper_way_circuit(sweep, SCORES, last_step=1)
    assert len(sweep.calls) == 1
    pd.testing.assert_frame_equal(first, full[full.step == 1])


def test_thresholds_and_classes_are_as_stated():
    """Each step keeps exactly the senders at or over its share (both signs for the logits,
    helpful paths only later), and the class comes from the path and the random-token scores."""
    table = P.paper_way_circuit(FakeSweep(), SCORES, P.PathsConfig(logits_share=0.05, queries_share=0.05,
                                                                   values_share=0.02, keys_share=0.02))
    got = {(r.layer, r["head"]): (r["class"], r.step) for _, r in table.iterrows()}
    assert got == {
        (5, 0): ("name mover", 1), (5, 1): ("negative name mover", 1), (4, 1): ("name mover", 1),
        (4, 0): ("name mover", 1), (3, 0): ("S-inhibition", 2), (2, 0): ("induction", 3),
        (1, 1): ("duplicate token", 3), (0, 0): ("previous token", 4),
    }
    stricter = P.paper_way_circuit(FakeSweep(), SCORES, P.PathsConfig(values_share=0.04, keys_share=0.03))
    assert set(zip(stricter.layer, stricter["head"])) == {(5, 0), (5, 1), (4, 1), (4, 0), (3, 0), (2, 0)}


def test_failed_checks_are_recorded_not_reclassified():
    table = P.paper_way_circuit(FakeSweep(), SCORES).set_index(["layer", "head"])
    assert not table.loc[(4, 0), "check"] and table.loc[(4, 0), "class"] == "name mover"
    assert "END->S2" in table.loc[(4, 0), "why"] and table.loc[(4, 0), "kept"]
    assert not table.loc[(0, 0), "check"] and "previous token random" in table.loc[(0, 0), "why"]
    assert table.loc[[(5, 0), (5, 1), (4, 1), (3, 0), (2, 0), (1, 1)], "check"].all()


def test_a_weaker_definition_lets_the_failed_head_receive():
    """The receivers follow the class definition given: with one every head passes, 4.0 receives
    the step-2 paths too."""
    sweep = FakeSweep()
    P.paper_way_circuit(sweep, SCORES, rules=EVERY_HEAD_PASSES)
    assert sweep.calls[1] == (((4, 0), (4, 1), (5, 0)), "q", "END", 0)


def test_circuit_keeps_each_class_at_its_paper_position():
    circuit = P.to_circuit(P.paper_way_circuit(FakeSweep(), SCORES))
    assert circuit.classes["name mover"] == ((4, 0), (4, 1), (5, 0))
    assert circuit.positions == {c: P.POSITIONS[c] for c in circuit.classes}
    assert circuit.positions["induction"] == "S2" and circuit.positions["previous token"] == "S1+1"


def test_ranking_puts_the_circuit_first_then_activation_patching():
    table = P.paper_way_circuit(FakeSweep(), SCORES)
    patching = _scores().assign(patched_metric=[0.01 * i for i in range(N_LAYERS * N_HEADS)])
    order = P.ranking(table, patching)
    assert order[:4] == [(5, 0), (5, 1), (4, 0), (4, 1)] and order[4] == (3, 0)
    assert sorted(order) == sorted(zip(patching.layer, patching["head"]))
    assert order[8:] == [h for h in [(5, 1), (5, 0), (4, 1), (4, 0), (3, 1), (3, 0), (2, 1), (2, 0),
                                     (1, 1), (1, 0), (0, 1), (0, 0)] if h not in order[:8]]


# --- A planted circuit in a real (tiny) model ----------------------------------------------------

PLANTED = {(0, 2), (1, 0), (2, 3)}


@pytest.fixture(scope="module")
def planted():
    """Tiny GPT-2 (3 layers x 4 heads) whose heads outside PLANTED write nothing (zero rows of
    W_O): only the planted heads can change the answer, through any path."""
    config = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64)
    model = _seeded(lambda: GPT2LMHeadModel(config), seed=1)
    d_head = config.n_embd // config.n_head
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            for head in range(config.n_head):
                if (layer, head) not in PLANTED:
                    block.attn.c_proj.weight[head * d_head:(head + 1) * d_head] = 0
    bridge = from_hf_model(model, gpt2_tokenizer_directory())
    bridge.ioi_name = "tiny-gpt2-planted"
    clean, corrupted = make_pair(bridge, n=12)
    return bridge, clean, corrupted


def _sweep(engine, model, clean, corrupted):
    def sweep(receivers, receiver_input, position, first_layer):
        if receivers == "logits":
            return engine(model, clean, corrupted, "logits", first_layer=first_layer)
        return engine(model, clean, corrupted, list(receivers), receiver_input, position, first_layer=first_layer)
    return sweep


def test_planted_circuit_is_found_exactly(planted):
    """With small thresholds the discovery keeps exactly the planted heads, and no other head's
    path moves the logit difference at any step."""
    model, clean, corrupted = planted
    frames = []

    def recording(*args):
        frames.append(_sweep(fast_paths.path_patching, model, clean, corrupted)(*args))
        return frames[-1]

    config = P.PathsConfig(logits_share=1e-3, queries_share=1e-3, values_share=1e-3, keys_share=1e-3)
    table = P.paper_way_circuit(recording, head_scores(model, clean), config, EVERY_HEAD_PASSES)
    assert set(zip(table.layer[table.kept], table["head"][table.kept])) == PLANTED
    for frame in frames:
        if frame.empty:  # receivers in layer 0: no senders
            continue
        others = frame[[(l, h) not in PLANTED for l, h in zip(frame.layer, frame["head"])]]
        assert others.relative_change.abs().max() < 1e-5


def test_fast_sweeps_give_the_hook_references_table(planted):
    """The same discovery on the hook-based path patching (`hooks_paths`) keeps the same heads
    with the same classes and effects."""
    model, clean, corrupted = planted
    scores = head_scores(model, clean)
    config = P.PathsConfig(logits_share=1e-3, queries_share=1e-3, values_share=1e-3, keys_share=1e-3)
    fast = P.paper_way_circuit(_sweep(fast_paths.path_patching, model, clean, corrupted), scores, config, EVERY_HEAD_PASSES)
    slow = P.paper_way_circuit(_sweep(hooks_paths.path_patching, model, clean, corrupted), scores, config, EVERY_HEAD_PASSES)
    pd.testing.assert_frame_equal(fast.drop(columns=["effect", "why"]), slow.drop(columns=["effect", "why"]))
    assert (fast.effect - slow.effect).abs().max() < 1e-4


def test_logits_threshold_splits_the_planted_heads(planted):
    """A logits share between two planted heads' |direct effects| keeps the stronger and not the
    weaker: the threshold is on |effect| as a share of the clean logit difference."""
    model, clean, corrupted = planted
    sweep = _sweep(fast_paths.path_patching, model, clean, corrupted)
    direct = sweep("logits", None, None, 0)
    effect = {(int(l), int(h)): abs(float(c)) for l, h, c in zip(direct.layer, direct["head"], direct.relative_change)}
    ranked = sorted(PLANTED, key=effect.get)
    share = (effect[ranked[0]] + effect[ranked[1]]) / 2
    config = P.PathsConfig(logits_share=share, queries_share=10.0, values_share=10.0, keys_share=10.0)
    table = P.paper_way_circuit(sweep, head_scores(model, clean), config, EVERY_HEAD_PASSES)
    assert set(zip(table.layer, table["head"])) == set(ranked[1:])
    assert (table.effect.abs() >= share).all()


@pytest.mark.parametrize("receivers, receiver_input, position", [("logits", "q", None), ([(2, 3), (2, 0)], "v", "S2")])
def test_first_layer_skips_only_the_earlier_senders(planted, receivers, receiver_input, position):
    """A sweep from `first_layer` gives the full sweep's rows for the senders it keeps."""
    model, clean, corrupted = planted
    full = fast_paths.path_patching(model, clean, corrupted, receivers, receiver_input, position)
    later = fast_paths.path_patching(model, clean, corrupted, receivers, receiver_input, position, first_layer=1)
    pd.testing.assert_frame_equal(later, full[full.layer >= 1].reset_index(drop=True))


@pytest.mark.slow
def test_circuit_cli_rows_carry_class_and_step(tmp_path, monkeypatch, capsys):
    """`circuit --json`: one row per kept head with its class, kept position, the step that
    found it and its check."""
    import json

    from ioi.cli import main

    monkeypatch.setenv("IOI_CACHE_DIR", str(tmp_path))
    argv = ["circuit", "--model", "gpt2-small-random", "--n", "4", "--json"]
    assert main(argv) == 0
    rows = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert {"class", "layer", "head", "position", "step", "effect", "check", "why"} <= set(rows.columns)
    assert (rows.position == rows["class"].map(P.POSITIONS)).all()
