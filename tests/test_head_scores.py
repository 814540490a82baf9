"""Head scores: attention scores read the right entries, copy scores are shares."""

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
