"""Indirect Object Identification (Wang et al. 2022), reproduced with TransformerLens."""
