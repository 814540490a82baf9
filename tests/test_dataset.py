"""The IOI dataset: positions point at the right tokens, corruptions do what they say,
seeds reproduce, and bad input is refused clearly."""

import re

import numpy as np
import pytest
import torch

from ioi import dataset as D
from ioi.dataset import make_dataset, repeated_random_tokens, swap_order, with_extra_io


@pytest.fixture(params=["gpt2_tokenizer", "smollm2_tokenizer"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def _decoded(tokenizer, ds, i, position):
    return tokenizer.decode([int(ds.tokens[i, ds.positions[position][i]])]).strip()


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_positions_point_at_the_named_tokens(tokenizer, prepend_bos):
    """IO, S1, S2 decode to the prompt's names, S1+1 follows S1 and END is the last real token,
    with and without BOS, for GPT-2's tokenizer and SmolLM2's."""
    ds = D.make_dataset(tokenizer, 40, seed=3, templates="full", prepend_bos=prepend_bos)
    for i, record in enumerate(ds.records):
        assert _decoded(tokenizer, ds, i, "IO") == record.io
        assert _decoded(tokenizer, ds, i, "S1") == record.s == _decoded(tokenizer, ds, i, "S2")
        assert ds.positions["S1+1"][i] == ds.positions["S1"][i] + 1
        real = tokenizer(ds.prompts[i], add_special_tokens=False)["input_ids"]
        assert ds.end[i] == len(real) - 1 + prepend_bos
        assert tokenizer.decode(ds.tokens[i, : ds.end[i] + 1]).endswith(ds.prompts[i])
        assert ds.io_token[i] == tokenizer(" " + record.io, add_special_tokens=False)["input_ids"][0]
    first = ds.tokens[:, 0]
    assert bool((first == D._bos_id(tokenizer)).all()) == prepend_bos


def test_abba_and_baba_orders(gpt2_tokenizer):
    """In BABA prompts S comes first; in ABBA prompts IO comes first."""
    ds = D.make_dataset(gpt2_tokenizer, 30, templates="full")
    io, s1 = ds.positions["IO"], ds.positions["S1"]
    baba = torch.as_tensor(ds.order == "BABA")
    assert (s1[baba] < io[baba]).all() and (io[~baba] < s1[~baba]).all()


def test_abc_keeps_template_and_changes_every_name(gpt2_tokenizer):
    """ABC keeps template, place and object, puts three distinct fresh names at IO, S1, S2,
    and keeps the clean answers for the metric."""
    clean = D.make_dataset(gpt2_tokenizer, 30, seed=1)
    abc = D.corrupt(clean, gpt2_tokenizer, "abc")
    for a, b in zip(clean.records, abc.records):
        assert a.template == b.template and a.place == b.place and a.object == b.object
        assert len(set(b.names.values())) == 3
        assert not set(b.names.values()) & set(a.names.values())
    assert torch.equal(abc.io_token, clean.io_token) and torch.equal(abc.s_token, clean.s_token)
    assert abc.tokens.shape == clean.tokens.shape


def test_swap_exchanges_io_and_s(gpt2_tokenizer):
    clean = D.make_dataset(gpt2_tokenizer, 10, seed=2)
    swapped = D.corrupt(clean, gpt2_tokenizer, "swap_io_s")
    for a, b in zip(clean.records, swapped.records):
        assert (b.io, b.s) == (a.s, a.io)


def test_same_seed_same_prompts_other_seed_other_prompts(gpt2_tokenizer):
    a = D.make_dataset(gpt2_tokenizer, 20, seed=7)
    b = D.make_dataset(gpt2_tokenizer, 20, seed=7)
    c = D.make_dataset(gpt2_tokenizer, 20, seed=8)
    assert a.prompts == b.prompts and torch.equal(a.tokens, b.tokens)
    assert a.prompts != c.prompts
    assert D.corrupt(a, gpt2_tokenizer).prompts == D.corrupt(b, gpt2_tokenizer).prompts


def test_templates_are_balanced_and_sets_have_the_paper_sizes(gpt2_tokenizer):
    """The mixed set is 7 BABA + 7 ABBA templates, the full set 15 + 15; each is used evenly."""
    assert len(D.select_templates("mixed")) == 14 and len(D.select_templates("full")) == 30
    ds = D.make_dataset(gpt2_tokenizer, 28, templates="mixed")
    counts = np.bincount(ds.template_id)
    assert set(counts[counts > 0]) == {2} and (ds.order == "ABBA").sum() == 14


def test_abba_version_swaps_the_first_two_names():
    assert D.abba_version("Then, [B] and [A] went. [B] gave a [OBJECT] to [A]") == (
        "Then, [A] and [B] went. [B] gave a [OBJECT] to [A]"
    )


def test_padding_does_not_reach_end(tiny_model):
    """Right padding never changes a prompt's END logits (the model is causal)."""
    ds = D.make_dataset(tiny_model.tokenizer, 12, templates="full")
    assert len(set(ds.end.tolist())) > 1  # the batch really mixes lengths
    logits = tiny_model(ds.tokens)
    for i in range(3):
        alone = tiny_model(ds.tokens[i : i + 1, : ds.end[i] + 1])[0, -1]
        torch.testing.assert_close(logits[i, ds.end[i]], alone, atol=1e-4, rtol=0)


def test_smollm2_drops_its_multi_token_names(smollm2_tokenizer):
    """Names that are several tokens for SmolLM2 are dropped and counted, never used."""
    ds = D.make_dataset(smollm2_tokenizer, 50)
    assert ds.names_dropped
    used = {n for r in ds.records for n in r.names.values()}
    assert not used & set(ds.names_dropped)


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_n_is_refused(gpt2_tokenizer, n):
    with pytest.raises(ValueError, match="must be positive"):
        D.make_dataset(gpt2_tokenizer, n)


def test_template_without_placeholders_is_refused():
    with pytest.raises(ValueError, match=r"\[A\] twice"):
        D.check_template("Then, John went to the [PLACE] and gave a [OBJECT] to")


def test_names_with_no_single_token_name_are_refused(gpt2_tokenizer):
    distribution = D.load_distribution()
    bad = D.Distribution(("Xzqwvlarkington", "Bartholomewsonius"), distribution.places,
                         distribution.objects, distribution.baba_templates, "test")
    with pytest.raises(ValueError, match="single token"):
        D.make_dataset(gpt2_tokenizer, 5, distribution=bad)


def test_unknown_template_set_is_refused(gpt2_tokenizer):
    with pytest.raises(ValueError, match="template set"):
        D.make_dataset(gpt2_tokenizer, 5, templates="nonsense")


# --- Variants for the paper's further experiments ----------------------------------------------


def test_swap_order_moves_s1_to_ios_slot_and_keeps_the_rest(gpt2_tokenizer):
    """The other name order with the same names: S is still repeated, its first mention now where
    IO's was; S2, END and the answer tokens stay."""
    clean = make_dataset(gpt2_tokenizer, 12, seed=3)
    flipped = swap_order(clean, gpt2_tokenizer)
    assert torch.equal(flipped.positions["IO"], clean.positions["S1"])
    assert torch.equal(flipped.positions["S1"], clean.positions["IO"])
    for p in ("S2", "END"):
        assert torch.equal(flipped.positions[p], clean.positions[p])
    assert torch.equal(flipped.io_token, clean.io_token) and torch.equal(flipped.s_token, clean.s_token)
    assert [r.template.order for r in flipped.records] != [r.template.order for r in clean.records]
    assert all(a.names == b.names for a, b in zip(flipped.records, clean.records))


def test_extra_io_inserts_before_s2_and_keeps_positions_right(gpt2_tokenizer):
    """The sentences go after the last full stop before S2; IO's position is its first mention,
    S1 and S2 still hold S, and END is the last token."""
    clean = make_dataset(gpt2_tokenizer, 20, seed=1)
    extra, kept = with_extra_io(clean, gpt2_tokenizer, "[A] was tired. [A] wanted to go home.")
    assert 0 < len(kept) < len(clean)  # some templates have no full stop before S2
    for row, i in enumerate(kept):
        text, record = extra.prompts[row], clean.records[i]
        assert f". {record.io} was tired. {record.io} wanted to go home. {record.s}" in text
        ids = extra.tokens[row]
        decode = lambda p: gpt2_tokenizer.decode([int(ids[extra.positions[p][row]])]).strip()  # noqa: E731
        assert decode("IO") == record.io and decode("S1") == decode("S2") == record.s
        assert int(extra.positions["END"][row]) == len(gpt2_tokenizer(text)["input_ids"]) - 1
    with pytest.raises(ValueError, match="full stop"):
        with_extra_io(clean.subset([r.template.text.find(". ") < 0 for r in clean.records]), gpt2_tokenizer, "[A] ran.")


def test_repeated_random_tokens_repeat_plain_words(gpt2_tokenizer):
    tokens = repeated_random_tokens(gpt2_tokenizer, 5, 10, seed=0, prepend_bos=True)
    assert tokens.shape == (5, 21)
    assert (tokens[:, 0] == gpt2_tokenizer.bos_token_id).all()
    assert torch.equal(tokens[:, 1:11], tokens[:, 11:])
    assert all(re.fullmatch(r" ?[A-Za-z]+", gpt2_tokenizer.decode([int(t)])) for t in tokens[:, 1:].flatten())
    assert torch.equal(tokens, repeated_random_tokens(gpt2_tokenizer, 5, 10, seed=0, prepend_bos=True))
    assert not torch.equal(tokens, repeated_random_tokens(gpt2_tokenizer, 5, 10, seed=1, prepend_bos=True))
