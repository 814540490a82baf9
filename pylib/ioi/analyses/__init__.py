"""Analyses that read a model's clean run without intervening on it.

- `logit_attribution`: direct logit attribution per head and layer, the logit lens
- `head_scores`: the paper's attention scores (previous-token, induction, ...) and copy scores
"""
