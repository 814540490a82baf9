"""Circuits as data, and the paper's three criteria for them (Wang et al. 2022 §4).

A circuit is a set of heads, each kept at the position its class works at (name movers at END,
induction heads at S2, ...). To run "only the circuit", every other (head, position) has its
output replaced by its mean over the ABC distribution, taken per template (the paper's
mean-ablation), so that the ablated heads carry the sentence structure but no names.

- Faithfulness: F(C) / F(M), where F is the mean logit difference, C the circuit alone and M
  the whole model. The paper: F(C) = 3.10 against F(M) = 3.56, 87%.
- Completeness: for subsets K of C, the incompleteness |F(C \\ K) - F(M \\ K)| is small when the
  circuit holds everything that matters (random, class-wise and greedy K).
- Minimality: for each head v in C there is a K for which removing v from C \\ K changes F.

Means are per template *and* per token alignment: prompts of one template can differ in length
when a place or object is several tokens, so we group by template and by the named positions.

`run_circuit` is the readable hook-based definition; the criteria run on `ioi.engines.fast_ablation`,
which computes the same numbers from one cached run per base circuit (tests/test_fast_ablation.py),
on every model where `ioi.engines.check` verifies the fast engine, and on `run_circuit` elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from ioi.engines import check, fast_ablation
from ioi.dataset import DATA_DIR, POSITIONS, IOIDataset
from ioi.metrics import BOOTSTRAP_RESAMPLES, bootstrap_ci, logit_diff_from_end
from ioi.engines.hooks import run_with_cache

Head = tuple[int, int]


@dataclass(frozen=True)
class Circuit:
    """Heads by class, and the position each class is kept at ("ALL" keeps every position)."""

    classes: dict  # class name -> tuple of (layer, head)
    positions: dict  # class name -> a name from dataset.POSITIONS, or "ALL"

    @property
    def heads(self) -> list[Head]:
        return sorted({h for heads in self.classes.values() for h in heads})

    def without(self, heads) -> "Circuit":
        drop = set(heads)
        return Circuit({c: tuple(h for h in hs if h not in drop) for c, hs in self.classes.items()}, self.positions)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{"class": c, "layer": l, "head": h, "position": self.positions[c]} for c, hs in self.classes.items() for l, h in hs]
        )


def load_circuit(path: Path = DATA_DIR / "circuits" / "wang2022_gpt2_small.json") -> Circuit:
    """A circuit from a JSON file such as the paper's 26-head circuit for GPT-2 small."""
    spec = json.loads(Path(path).read_text())
    parse = lambda s: tuple(int(x) for x in s.split("."))  # noqa: E731
    return Circuit(
        {c["class"]: tuple(parse(h) for h in c["heads"]) for c in spec["classes"]},
        {c["class"]: c["position"] for c in spec["classes"]},
    )


def whole_model(model) -> Circuit:
    heads = tuple((l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads))
    return Circuit({"all": heads}, {"all": "ALL"})


def check_circuit(model, circuit: Circuit) -> None:
    for layer, head in circuit.heads:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(f"Head {layer}.{head} is not in this model ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads).")
    for name, pos in circuit.positions.items():
        if pos != "ALL" and pos not in POSITIONS:
            raise ValueError(f"Class {name!r} is kept at {pos!r}; use one of {POSITIONS} or ALL.")


# --- Mean ablation ------------------------------------------------------------------------------


def alignment_groups(dataset: IOIDataset) -> np.ndarray:
    """A group id per prompt: same template and same index for every named position and END."""
    keys = list(zip(dataset.template_id, *(dataset.positions[p].tolist() for p in POSITIONS)))
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return np.array([index[k] for k in keys])


def group_means(model, reference: IOIDataset, names=None) -> dict:
    """Each head's output (hook_z), or the activations `names`, averaged over the reference
    prompts of each group; `groups` gives each prompt's group."""
    names = names or [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, reference, names)
    groups = torch.as_tensor(alignment_groups(reference))
    n_groups = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=n_groups)
    means = {}
    for name in names:
        act = cache[name]
        sums = torch.zeros(n_groups, *act.shape[1:], dtype=act.dtype).index_add_(0, groups, act)
        means[name] = sums / counts.reshape(-1, *[1] * (act.ndim - 1))
    return {"means": means, "groups": groups}


def resampled_values(model, reference: IOIDataset) -> dict:
    """For resample-ablation, in `group_means`' format: each prompt's own reference (ABC) prompt's
    head outputs, every prompt its own group. The hook-based reference for
    `fast_ablation.prepare_resampled`."""
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, reference, names)
    return {"means": {name: cache[name] for name in names}, "groups": torch.arange(len(reference))}


def keep_mask(model, circuit: Circuit, dataset: IOIDataset) -> Bool[Tensor, "layer batch pos head"]:
    """True where a head's output is kept: a circuit head at its class's position."""
    batch, width = dataset.tokens.shape
    mask = torch.zeros(model.cfg.n_layers, batch, width, model.cfg.n_heads, dtype=torch.bool)
    rows = torch.arange(batch)
    for cls, heads in circuit.classes.items():
        for layer, head in heads:
            if circuit.positions[cls] == "ALL":
                mask[layer, :, :, head] = True
            else:
                mask[layer, rows, dataset.positions[circuit.positions[cls]], head] = True
    return mask


def run_circuit(model, circuit: Circuit, dataset: IOIDataset, means: dict) -> Float[Tensor, " batch"]:
    """Per-prompt logit difference with everything outside the circuit mean-ablated.

    `means` comes from `group_means` on the dataset's ABC corruption, whose prompts are
    aligned one to one with the dataset's, so each prompt takes its own group's mean."""
    check_circuit(model, circuit)
    mask = keep_mask(model, circuit, dataset)
    groups = means["groups"]

    def hooks(rows: slice) -> list:
        def ablate(z, hook):
            layer = hook.layer()
            mean = means["means"][hook.name][groups[rows]]
            return torch.where(mask[layer, rows][..., None], z, mean)

        return [(f"blocks.{l}.attn.hook_z", ablate) for l in range(model.cfg.n_layers)]

    end_logits, _ = run_with_cache(model, dataset, [], hooks)
    return logit_diff_from_end(end_logits, dataset.io_token, dataset.s_token)


# --- The three criteria --------------------------------------------------------------------------
#
# They run on the fast engine (`ioi.engines.fast_ablation`): the same numbers as `run_circuit`, computed
# from one cached run per base circuit, each knockout only from the layer where it starts to differ.


@dataclass(frozen=True)
class HookAblation:
    """Mean-ablation by `run_circuit`, for models the fast engine does not compute exactly."""

    means: dict  # from `group_means` on the ABC prompts


def mean_ablation(model, clean: IOIDataset, corrupted: IOIDataset) -> fast_ablation.MeanAblation | HookAblation:
    """The clean prompts with each head's per-template, per-alignment mean over the ABC prompts:
    for the fast engine where `ioi.engines.check` verifies it on this model, else for hooks."""
    if not check.use_fast(model, clean, corrupted):
        return HookAblation(group_means(model, corrupted))
    groups = torch.as_tensor(alignment_groups(corrupted))
    return fast_ablation.prepare(
        model, clean.tokens, clean.end, clean.io_token, clean.s_token, corrupted.tokens, groups
    )


def resampling(model, clean: IOIDataset, corrupted: IOIDataset) -> fast_ablation.MeanAblation | HookAblation:
    """The clean prompts with each ablated head's output taken from the prompt's own ABC
    counterpart (resample-ablation; Miller et al. 2024 compare it with mean-ablation): for the
    fast engine where `ioi.engines.check` verifies it on this model, else for hooks."""
    if not check.use_fast(model, clean, corrupted):
        return HookAblation(resampled_values(model, corrupted))
    return fast_ablation.prepare_resampled(
        model, clean.tokens, clean.end, clean.io_token, clean.s_token, corrupted.tokens
    )


def circuit_logit_diffs(
    model, circuits: list[Circuit], clean: IOIDataset, ablation, base: Circuit | None = None
) -> Float[Tensor, "circuit batch"]:
    """Per-prompt logit difference of each circuit run alone (everything else mean-ablated).
    Give as `base` the circuit they are knockouts of: each runs from where it differs from it."""
    for circuit in circuits:
        check_circuit(model, circuit)
    if isinstance(ablation, HookAblation):
        return torch.stack([run_circuit(model, c, clean, ablation.means) for c in circuits])
    keeps = [keep_mask(model, c, clean) for c in circuits]
    return fast_ablation.logit_diffs(ablation, keeps, None if base is None else keep_mask(model, base, clean))


def ratio_ci(numerator, denominator, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval for mean(numerator) / mean(denominator) over prompts."""
    res = stats.bootstrap(
        (np.asarray(numerator), np.asarray(denominator)),
        lambda a, b: np.mean(a) / np.mean(b),
        paired=True,
        vectorized=False,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def circuit_and_model(model, circuit, clean, corrupted, ablation):
    """Per-prompt F(C) and F(M) (the whole model) as float64 arrays."""
    ablation = ablation or mean_ablation(model, clean, corrupted)
    values = circuit_logit_diffs(model, [circuit, whole_model(model)], clean, ablation)
    return values[0].double().numpy(), values[1].double().numpy()


def circuit_and_model_by_length(model, circuit, clean, corrupted):
    """`circuit_and_model` under mean-ablation, the prompts of one length at a time. A prompt's
    mean comes from the ABC prompts of its group (`alignment_groups`: same template, same
    positions, so the same length), and the fast engine runs one length at a time anyway: the
    template sweep's 600 prompts gave the same numbers to the bit on SmolLM2-135M and Gemma-3-270M,
    and peaked on SmolLM2 at 2.96 GB instead of 5.97 GB (the model's load: 1.55 GB)."""
    f_c, f_m = np.empty(len(clean)), np.empty(len(clean))
    end = clean.positions["END"].numpy()
    for length in np.unique(end):
        at = end == length
        f_c[at], f_m[at] = circuit_and_model(model, circuit, clean.subset(at), corrupted.subset(at), None)
    return f_c, f_m


def faithfulness(model, circuit: Circuit, clean: IOIDataset, corrupted: IOIDataset, seed: int = 0, ablation=None) -> dict:
    """F(C), F(M) and F(C)/F(M) with a 95% paired bootstrap interval."""
    f_c, f_m = circuit_and_model(model, circuit, clean, corrupted, ablation)
    low, high = ratio_ci(f_c, f_m, seed)
    return {
        "F_C": float(f_c.mean()),
        "F_M": float(f_m.mean()),
        "faithfulness": float(f_c.mean() / f_m.mean()),
        "faithfulness_ci_low": low,
        "faithfulness_ci_high": high,
        "n": len(f_c),
    }


def faithfulness_by_template(model, circuit: Circuit, clean: IOIDataset, corrupted: IOIDataset, seed: int = 0) -> pd.DataFrame:
    """Faithfulness and the baseline logit difference per template, each with its CI."""
    f_c, f_m = circuit_and_model(model, circuit, clean, corrupted, None)
    rows = []
    for template_id in sorted(set(clean.template_id)):
        at = clean.template_id == template_id
        low, high = ratio_ci(f_c[at], f_m[at], seed) if at.sum() > 1 else (np.nan, np.nan)
        ld_low, ld_high = bootstrap_ci(f_m[at], seed)
        rows.append(
            {
                "template_id": int(template_id),
                "order": clean.order[at][0],
                "n": int(at.sum()),
                "logit_diff_mean": float(f_m[at].mean()),
                "logit_diff_ci_low": ld_low,
                "logit_diff_ci_high": ld_high,
                "faithfulness": float(f_c[at].mean() / f_m[at].mean()),
                "faithfulness_ci_low": low,
                "faithfulness_ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def knockouts(model, base: Circuit, subsets: list, clean: IOIDataset, ablation) -> np.ndarray:
    """F(base \\ K), the mean logit difference, for each K in `subsets`."""
    variants = [base.without(k) for k in subsets]
    return circuit_logit_diffs(model, variants, clean, ablation, base=base).mean(-1).double().numpy()


def completeness(
    model, circuit: Circuit, clean: IOIDataset, corrupted: IOIDataset, n_random: int = 10,
    greedy_size: int = 3, greedy_candidates: int | None = None, seed: int = 0,
) -> pd.DataFrame:
    """Incompleteness |F(C \\ K) - F(M \\ K)| for random, class-wise and greedy subsets K.
    `greedy_candidates` limits each greedy step's exact runs to the heads a first-order estimate
    ranks highest (None: every head, the paper's search)."""
    ablation = mean_ablation(model, clean, corrupted)
    rng = np.random.default_rng(seed)
    subsets = [("empty", ())]
    subsets += [(f"class: {c}", hs) for c, hs in circuit.classes.items() if hs]
    for i in range(n_random):
        subsets.append((f"random {i}", tuple(h for h in circuit.heads if rng.random() < 0.5)))
    ks = [heads for _, heads in subsets]
    f_c = knockouts(model, circuit, ks, clean, ablation)
    f_m = knockouts(model, whole_model(model), ks, clean, ablation)
    rows = [_incompleteness_row(kind, k, c, m) for (kind, k), c, m in zip(subsets, f_c, f_m)]
    rows.append(_greedy_subset(model, circuit, clean, ablation, greedy_size, greedy_candidates))
    return pd.DataFrame(rows)


def _incompleteness_row(kind: str, heads, f_c_k: float, f_m_k: float) -> dict:
    return {
        "subset": kind,
        "K": " ".join(f"{l}.{h}" for l, h in heads),
        "F_C_minus_K": float(f_c_k),
        "F_M_minus_K": float(f_m_k),
        "incompleteness": abs(float(f_c_k) - float(f_m_k)),
    }


def _greedy_subset(model, circuit, clean, ablation, size: int, candidates: int | None) -> dict:
    """The paper's greedy search: grow K one head at a time, each time taking the head that
    makes the incompleteness largest. With `candidates`, each step runs exactly only the heads
    whose knockouts `fast_ablation.knockout_estimates` ranks highest."""
    whole = whole_model(model)
    chosen: list[Head] = []
    best = None
    for _ in tqdm(range(min(size, len(circuit.heads))), desc="greedy completeness", leave=False):
        remaining = [h for h in circuit.heads if h not in chosen]
        if candidates is not None and candidates < len(remaining):
            remaining = _screen(model, circuit.without(chosen), whole.without(chosen), remaining, clean, ablation, candidates)
        singles = [(h,) for h in remaining]
        f_c = knockouts(model, circuit.without(chosen), singles, clean, ablation)
        f_m = knockouts(model, whole.without(chosen), singles, clean, ablation)
        i = int(np.argmax(np.abs(f_c - f_m)))
        chosen.append(remaining[i])
        best = _incompleteness_row("greedy", chosen, f_c[i], f_m[i])
    return best


def _screen(model, c_minus_k: Circuit, m_minus_k: Circuit, heads: list, clean, ablation, keep: int) -> list:
    """The `keep` heads with the largest estimated |F(C \\ (K + h)) - F(M \\ (K + h))| (every
    head, for the exact search, where the estimate's fast engine is not verified)."""
    if isinstance(ablation, HookAblation):
        return heads
    f_c, change_c = fast_ablation.knockout_estimates(ablation, keep_mask(model, c_minus_k, clean))
    f_m, change_m = fast_ablation.knockout_estimates(ablation, keep_mask(model, m_minus_k, clean))
    estimate = {h: abs(f_c + float(change_c[h]) - f_m - float(change_m[h])) for h in heads}
    return sorted(heads, key=estimate.get, reverse=True)[:keep]


def minimality(model, circuit: Circuit, clean: IOIDataset, corrupted: IOIDataset) -> pd.DataFrame:
    """For each head v: |F(C \\ (K + v)) - F(C \\ K)| relative to F(C), for K empty and K = the
    rest of v's class (the paper's App. K picks K by hand; we take the larger of the two).
    F(C \\ {v}) runs from C's cached run, F(C \\ (class - v)) from C \\ class's: each from v's layer."""
    ablation = mean_ablation(model, clean, corrupted)
    heads = circuit.heads
    singles = knockouts(model, circuit, [()] + [(v,) for v in heads], clean, ablation)
    f_c, f_without = singles[0], dict(zip(heads, singles[1:]))
    rows = []
    for cls, members in tqdm(list(circuit.classes.items()), desc="minimality", leave=False):
        if not members:
            continue
        # K = rest of class: C \ K is C \ class with v restored; C \ (K + v) is C \ class
        without_class = circuit.without(members)
        rest = circuit_logit_diffs(
            model, [without_class] + [circuit.without(set(members) - {v}) for v in members],
            clean, ablation, base=without_class,
        ).mean(-1).double().numpy()
        f_class, f_rest = rest[0], rest[1:]
        for v, f_rest_v in zip(members, f_rest):
            options = {"empty": (f_c, f_without[v]), "rest of class": (f_rest_v, f_class)}
            k_name = max(options, key=lambda k: abs(options[k][1] - options[k][0]))
            before, after = options[k_name]
            change = abs(after - before)
            rows.append({"class": cls, "layer": v[0], "head": v[1], "K": k_name, "F_before": float(before),
                         "F_after": float(after), "change": float(change), "relative_change": float(change / abs(f_c))})
    return pd.DataFrame(rows)
