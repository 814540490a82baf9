"""Head scores: attention scores read the right entries, copy scores are shares."""

import pandas as pd
import pytest
import torch
from conftest import make_pair

from ioi.analyses import head_scores


def test_attention_scores_read_the_named_entries(tiny_model):
    """The previous-token score equals the pattern entry from S1+1 to S1, averaged."""
    clean, _ = make_pair(tiny_model, n=6)
    table = head_scores.attention_scores(tiny_model, clean)
    _, cache = tiny_model.run_with_cache(clean.tokens)
    pattern = cache["blocks.1.attn.hook_pattern"]
    rows = torch.arange(len(clean))
    expected = pattern[rows, 2, clean.positions["S1+1"], clean.positions["S1"]].mean().item()
    got = table[(table.layer == 1) & (table["head"] == 2)].previous_token.item()
    assert abs(got - expected) < 1e-6
    assert len(table) == tiny_model.cfg.n_layers * tiny_model.cfg.n_heads


def test_copy_scores_are_shares(tiny_model):
    """Copy scores are fractions of names, and a head cannot both copy and anti-copy a name
    into the top 5 of a vocabulary much larger than 10."""
    clean, _ = make_pair(tiny_model, n=6)
    table = head_scores.copy_scores(tiny_model, clean)
    assert table.copy_score.between(0, 1).all() and table.negative_copy_score.between(0, 1).all()
    assert ((table.copy_score + table.negative_copy_score) <= 1).all()
    # a stride past the vocabulary screens one column, so every row is whole: the readable way
    pd.testing.assert_frame_equal(table, head_scores.copy_scores(tiny_model, clean, screen_stride=10**9))


@pytest.mark.parametrize("stride", [1, 16, 1000])
def test_screened_copy_hits_are_the_whole_rows_top_5(stride):
    """`copy_hits` screens a stride of the vocabulary before computing whole rows: its answers
    are those of the top 5 of every whole row, whichever rows the screen settles (all of them
    with stride 1, few with 1000), with targets at every rank, the top ones included."""
    torch.manual_seed(0)
    d, vocab, n = 16, 5000, 300
    W_U, b_U = torch.randn(d, vocab), torch.randn(vocab)
    unembedded = torch.randn(n, d)
    logits = unembedded @ W_U + b_U
    order = logits.argsort(-1, descending=True)
    ranks = torch.arange(n) % 40  # ranks 0..39 from the top, then the same from the bottom
    targets = torch.where(torch.arange(n) < n // 2, order[torch.arange(n), ranks], order[torch.arange(n), -1 - ranks])
    copied, anti = head_scores.copy_hits(unembedded, W_U, b_U, targets, stride)
    expected = (logits.topk(5).indices == targets[:, None]).any(-1)
    expected_anti = ((-logits).topk(5).indices == targets[:, None]).any(-1)
    assert torch.equal(copied, expected) and torch.equal(anti, expected_anti)
    assert 0 < int(expected.sum()) < n and 0 < int(expected_anti.sum()) < n


def test_random_token_scores_read_the_named_entries(tiny_model):
    """On repeated random tokens: induction reads the entry from each second-copy token to the
    token after its earlier copy, duplicate-token to the earlier copy, previous-token to the
    token before; with a BOS column everything shifts by one."""
    from ioi.dataset import repeated_random_tokens

    length = 6
    for bos in (False, True):
        tokens = repeated_random_tokens(tiny_model.tokenizer, 4, length, seed=0, prepend_bos=bos)
        table = head_scores.random_token_scores(tiny_model, tokens, length).set_index(["layer", "head"])
        _, cache = tiny_model.run_with_cache(tokens)
        pattern = cache["blocks.2.attn.hook_pattern"][:, 1]  # [batch query key]
        o = int(bos)
        second = torch.arange(o + length, o + 2 * length)
        expected = {"induction_random": pattern[:, second, second - length + 1].mean(),
                    "duplicate_token_random": pattern[:, second, second - length].mean(),
                    "previous_token_random": pattern[:, torch.arange(o + 1, o + 2 * length), torch.arange(o, o + 2 * length - 1)].mean()}
        for score, value in expected.items():
            assert abs(table.loc[(2, 1), score] - value.item()) < 1e-6, (bos, score)


def test_random_token_scores_refuse_sequences_of_another_shape(tiny_gpt2):
    import pytest

    with pytest.raises(ValueError, match="2 x 6 tokens"):
        head_scores.random_token_scores(tiny_gpt2, torch.zeros(2, 15, dtype=torch.long), 6)
