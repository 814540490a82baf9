"""The report layer: what the chapters print, from a Study's results.

- `tables`: DataFrames that combine analyses (path-patching steps, the circuit graph, ...)
- `figures`: every chart (a DataFrame in, an altair chart out) and how it is shown per format
- `text`: inline numbers and the sentences generated from results
- `scorecard`: published claims, measured and judged
"""
