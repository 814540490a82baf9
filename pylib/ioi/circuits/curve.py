"""Faithfulness against circuit size: how many heads does it take to keep the behaviour?

A single circuit scored at one threshold says little about the procedure that found it; the
field's benchmark (MIB, Mueller et al. 2025) scores circuit discovery by faithfulness across
circuit sizes instead. Here: rank every head by a method, keep the top k (k on a log-spaced grid
from 1 to all heads), ablate every other head, and read F(C_k) / F(M) (Wang et al. 2022 §4).

Methods (each a full ranking of the heads):
- "paths": the paper-way procedure (`ioi.circuits.paths_discovery.ranking`): its circuit's heads
  by step and path effect, then the rest by |activation patching|;
- "activation patching": |normalised effect of patching the head's clean output, all positions|;
- "attribution patching": |its first-order estimate| (`ioi.engines.attribution`);
- "random": a random order per seed (`random_seeds` seeds, recorded in the `seed` column).

Ablations, side by side (Miller et al. 2024, "Transformer Circuit Faithfulness Metrics Are Not
Robust", find the choice moves faithfulness more than anything else):
- "mean": the paper's, each ablated head's output replaced by its mean over the ABC prompts of the
  prompt's template (and token alignment), as `ioi.circuits.criteria` does;
- "resample": each prompt's own ABC counterpart's output (`criteria.resampling`).

Positions: the curve keeps each of the top-k heads at every position (a ranking orders heads, not
head-positions), so the curve's point at k is `criteria.faithfulness` of Circuit({top k}, "ALL").
The paper-way circuit at its class positions (and on GPT-2 small, the paper's 26 heads) are added
as single points (`method` "paths circuit", "paper circuit").

Summaries (`summarise`): the smallest grid k whose faithfulness reaches the target (0.8), and the
area under the curve, by the trapezoid rule over x = log(k) / log(n_heads), so that x runs from 0
(one head) to 1 (every head) and a curve at 1 throughout has area 1 (faithfulness is not clipped:
values above 1 or below 0 count as they are). Random's summary uses the mean over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ioi.circuits import criteria
from ioi.circuits.criteria import Circuit

Head = tuple[int, int]
COLUMNS = ["method", "ablation", "k", "seed", "faithfulness", "ci_low", "ci_high"]


@dataclass(frozen=True)
class CurveConfig:
    points: int = 12  # log-spaced k from 1 to every head: ~3 points per factor of 2.5 on SmolLM2
    random_seeds: int = 3  # random orders; their spread is the band, their mean the summary
    target: float = 0.8  # the faithfulness whose smallest k is reported (the study's target)


def k_grid(n_heads: int, points: int) -> list[int]:
    """Distinct integers log-spaced from 1 to n_heads, both ends included."""
    return sorted({int(round(k)) for k in np.geomspace(1, n_heads, points)} | {1, n_heads})


def random_rankings(n_layers: int, n_heads: int, seeds: int) -> dict[int, list[Head]]:
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    out = {}
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(heads))
        out[seed] = [heads[i] for i in order]
    return out


def by_size(frame: pd.DataFrame, column: str) -> list[Head]:
    """Heads of a (layer, head, column) table by |column|, largest first."""
    order = frame.assign(size=frame[column].abs()).sort_values("size", ascending=False, kind="stable")
    return [(int(l), int(h)) for l, h in zip(order.layer, order["head"])]


def faithfulness_curve(
    model, clean, corrupted, rankings: dict, ablations: dict, grid: list[int], points: dict | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, seed, ablation, k): faithfulness of the top-k heads of each ranking,
    each head kept at every position, with a 95% paired bootstrap interval.

    `rankings` maps (method, seed or None) to a list of every head; `ablations` maps a name to a
    prepared ablation (`criteria.mean_ablation`, `criteria.resampling`); `points` maps a method
    name to a Circuit evaluated as one extra point (k = its number of heads)."""
    rows = []
    for name, ablation in ablations.items():
        f_m = _run(model, [criteria.whole_model(model)], clean, ablation)[0]
        for (method, rank_seed), heads in rankings.items():
            circuits = [Circuit({"top": tuple(heads[:k])}, {"top": "ALL"}) for k in grid]
            for k, f_c in zip(grid, _run(model, circuits, clean, ablation)):
                rows.append(_row(method, name, k, rank_seed, f_c, f_m, seed))
        for method, circuit in (points or {}).items():
            f_c = _run(model, [circuit], clean, ablation)[0]
            rows.append(_row(method, name, len(circuit.heads), None, f_c, f_m, seed))
    return pd.DataFrame(rows, columns=COLUMNS)


def _run(model, circuits, clean, ablation) -> np.ndarray:
    """Per-prompt F of each circuit, float64. The circuits of one ranking are nested, so each runs
    from the first circuit's cached run at the first layer where it differs from it."""
    return criteria.circuit_logit_diffs(model, circuits, clean, ablation).double().numpy()


def _row(method, ablation, k, seed, f_c, f_m, bootstrap_seed) -> dict:
    low, high = criteria.ratio_ci(f_c, f_m, bootstrap_seed)
    return {"method": method, "ablation": ablation, "k": int(k), "seed": seed,
            "faithfulness": float(f_c.mean() / f_m.mean()), "ci_low": low, "ci_high": high}


def summarise(frame: pd.DataFrame, n_heads: int, target: float = 0.8) -> pd.DataFrame:
    """Per method and ablation: the smallest grid k reaching `target` (NaN if none does) and the
    area under the curve over log k normalised to [0, 1] (see the module docstring). Random's
    curve is the mean over its seeds (`seeds` says how many)."""
    rows = []
    curves = frame[frame.method.isin(_curve_methods(frame))]
    for (method, ablation), group in curves.groupby(["method", "ablation"], sort=False):
        by_k = group.groupby("k").faithfulness
        mean = by_k.mean()
        reached = mean[mean >= target]
        x = np.log(mean.index.to_numpy(float)) / np.log(n_heads)
        rows.append({
            "method": method, "ablation": ablation,
            "smallest_k": float(reached.index.min()) if len(reached) else np.nan,
            "area": float(np.trapezoid(mean.to_numpy(), x)) if len(mean) > 1 else np.nan,
            "seeds": int(group.seed.nunique()),
        })
    return pd.DataFrame(rows)


def _curve_methods(frame: pd.DataFrame) -> list[str]:
    """Methods with more than one k (the single-circuit points are not curves)."""
    counts = frame.groupby("method").k.nunique()
    return counts[counts > 1].index.tolist()
