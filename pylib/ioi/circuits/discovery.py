"""The fewest top-ranked heads that keep the behaviour: a circuit's size without the paper's hand.

The paper-way discovery (`ioi.circuits.paths_discovery`) finds a circuit by path patching,
with thresholds per step, so its size follows those thresholds. A size that does not: rank every
head by one cheap, exact-enough estimate of its importance (attribution patching,
`ioi.engines.attribution`, where the fast engine is exact on the model; else activation patching),
keep the top k heads at every position and mean-ablate the rest (per-template ABC means), and
find the smallest k whose faithfulness F(C_k)/F(M) reaches the target, by bisection over k.
Each faithfulness is computed exactly; only the order is estimated. Faithfulness grows with k in
practice; where it does not, bisection still returns a k that meets the target, just not always
the smallest. The faithfulness curve (`ioi.circuits.curve`) draws the whole picture.
"""

from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from ioi.circuits.criteria import Circuit, circuit_logit_diffs, mean_ablation, whole_model

Head = tuple[int, int]


def smallest_top_k(model, clean, corrupted, ranking: list[Head], target: float = 0.8) -> pd.DataFrame:
    """The heads in `ranking` order, with `in_circuit` marking the smallest top-k reaching the
    target faithfulness, and `faithfulness` at each k the bisection evaluated."""
    ablation = mean_ablation(model, clean, corrupted)
    f_m = circuit_logit_diffs(model, [whole_model(model)], clean, ablation).mean()

    def faith(k: int) -> float:
        circuit = Circuit({"top k": tuple(ranking[:k])}, {"top k": "ALL"})
        return float(circuit_logit_diffs(model, [circuit], clean, ablation).mean() / f_m)

    evaluated = {}
    low, high = 0, len(ranking)  # faith(len(ranking)) is 1 for a full ranking: nothing is ablated
    with tqdm(desc="smallest faithful top-k", leave=False) as progress:
        while high - low > 1:
            mid = (low + high) // 2
            evaluated[mid] = faith(mid)
            low, high = (low, mid) if evaluated[mid] >= target else (mid, high)
            progress.update()
    evaluated.setdefault(high, faith(high))
    table = pd.DataFrame(ranking, columns=["layer", "head"]).assign(rank=range(1, len(ranking) + 1))
    return table.assign(in_circuit=table["rank"] <= high, faithfulness=table["rank"].map(evaluated))
