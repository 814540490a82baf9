"""Circuits: sets of heads with classes, and how they are judged and found.

- `criteria`: the paper's faithfulness, completeness and minimality (mean-ablation over ABC)
- `discovery`: finding a circuit on a model the paper did not study
"""
