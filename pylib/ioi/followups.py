"""Follow-up experiments that each change one factor of the study and hold the rest fixed.

1. Model size (`size_sweep`). Does the paper's circuit survive scale? Two sizes of one family
   on the same prompts (Qwen2.5-Coder 0.5B and 1.5B offline, which share a tokenizer; GPT-2 small
   to XL where the Hugging Face hub is reachable), each measured by the claims of `ioi.claims`
   whose cost fits a laptop: the behaviour, the heads that write the answer, name movers,
   negative name movers, backup name movers and the smallest faithful circuit, each with its
   verdict; other families (SmolLM2, Gemma 3) join as points of comparison, not as sizes.
   `size_trend` says, per measure and family, whether it changes between the smallest and the
   largest size beyond its 95% intervals.
2. Template (`template_sweep`). One model and one fixed circuit, evaluated on each of the 30
   templates (15 BABA and their ABBA versions) separately. Miller et al. 2024 report that the
   Wang circuit's faithfulness splits by name order on GPT-2 small (ABBA 57-99%, BABA 98-155%),
   so besides one row per template we pool the prompts of each order and bootstrap the
   difference between the two orders.

Both return tidy DataFrames (compute only: their sentences are in `ioi.report.text`, their charts
in `ioi.report.figures`, their command line in `ioi.cli`); models whose weights cannot be had
here become rows with status "skipped" and the reason, and the rest still run.
Every expensive step goes through `Study`, so reruns are served from the results cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ioi import claims_table
from ioi.circuits import criteria
from ioi.dataset import load_distribution
from ioi.metrics import BOOTSTRAP_RESAMPLES, bootstrap_ci
from ioi.weights import KNOWN_MODELS, ModelUnavailableError
from ioi.study import Study, StudyConfig


@dataclass(frozen=True)
class ModelFacts:
    family: str
    n_params: float  # published parameter count, so that a skipped model still has its place


MODELS = {
    "gpt2-small": ModelFacts("GPT-2", 124e6), "gpt2-medium": ModelFacts("GPT-2", 355e6),
    "gpt2-large": ModelFacts("GPT-2", 774e6), "gpt2-xl": ModelFacts("GPT-2", 1558e6),
    "pythia-70m": ModelFacts("Pythia", 70e6), "pythia-160m": ModelFacts("Pythia", 160e6),
    "pythia-410m": ModelFacts("Pythia", 410e6), "pythia-1b": ModelFacts("Pythia", 1011e6),
    "qwen2.5-coder-0.5b": ModelFacts("Qwen2.5-Coder", 494e6), "qwen2.5-coder-1.5b": ModelFacts("Qwen2.5-Coder", 1544e6),
    "smollm2-135m": ModelFacts("SmolLM2", 135e6), "gemma3-270m": ModelFacts("Gemma 3", 268e6),
}
GPT2_SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
QWEN_SIZES = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
SIZE_CLAIMS = ("behaviour", "direct_writers", "name_movers", "negative_name_movers", "backup", "small_circuit")
# Exhaustive enumeration of all prompts of the 15 BABA templates, BOS on (mean logit difference).
ENUMERATION_LOGIT_DIFF = {"gpt2-small": 3.79, "gpt2-medium": 4.18, "gpt2-large": 4.68}
MILLER_2024_FAITHFULNESS = {"ABBA": (0.57, 0.99), "BABA": (0.98, 1.55)}  # range over templates
N_SIZE = 100  # prompts per size: the main study's default, so a size's rows reuse its cache
N_PER_TEMPLATE = 20  # x 30 templates = 600 prompts: minutes on a laptop CPU for a 135M model
SIZE_COLUMNS = ["model", "family", "n_params", "n_layers", "n_heads", "status", "reason", "measure", "value",
                "ci_low", "ci_high", "unit", "verdict", "seconds"]


# --- Follow-up 1: model size --------------------------------------------------------------------


def size_sweep(
    models: Sequence[str] = QWEN_SIZES, n: int = N_SIZE, seed: int = 0, device: str = "cpu",
    release_first: Sequence[Study | None] = (),
) -> pd.DataFrame:
    """One row per model and measure, in the order given: the logit difference and each claim
    of `SIZE_CLAIMS`, with its 95% CI where one exists and its verdict; a model that cannot be
    loaded is one row with status "skipped" and the reason. Everything but the model is fixed:
    the prompts (n, seed, the "mixed" templates, the model's BOS convention), the class
    definitions and the claims' rules. One model is held in memory at a time: the models of the
    studies in `release_first` are let go before the first size (`Study.release_model`; an
    analysis that needs one again loads it again), and each size after its rows; a size whose
    results are all cached is never loaded (`ioi.study`)."""
    for name in models:
        _check_model_name(name)
    for study in release_first:
        if study is not None:
            study.release_model()
    rows = []
    for name in tqdm(models, desc="size sweep"):
        start = time.perf_counter()
        facts = MODELS.get(name, ModelFacts(name, float("nan")))
        base = {"model": name, "family": facts.family, "n_params": facts.n_params}
        try:
            study = Study(StudyConfig(model=name, n=n, seed=seed, device=device))
        except ModelUnavailableError as error:
            rows.append({**base, "status": "skipped", "reason": str(error).split("\n")[0]})
            continue
        measured = model_rows(study)
        study.release_model()  # before the next size: the largest take GBs
        seconds = round(time.perf_counter() - start, 2)
        rows += [{**base, **row, "seconds": seconds} for row in measured]
    return pd.DataFrame(rows, columns=SIZE_COLUMNS)


def study_rows(study: Study) -> pd.DataFrame:
    """`size_sweep`'s rows for a study already at hand (the main study, the second family), to
    stand beside the size ladder as points of comparison."""
    name = study.config.model
    facts = MODELS.get(name, ModelFacts(name, float("nan")))
    rows = [{"model": name, "family": facts.family, **row, "seconds": np.nan} for row in model_rows(study)]
    return pd.DataFrame(rows, columns=SIZE_COLUMNS)


def _check_model_name(name: str) -> None:
    """Fail before any model runs when a name is neither known nor a local directory."""
    if name not in KNOWN_MODELS and not Path(name).expanduser().is_dir():
        raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}.")


def model_rows(study: Study) -> list[dict]:
    """The size follow-up's measures on one model: its logit difference, and each claim of
    `SIZE_CLAIMS` with its value, CI and verdict (`ioi.claims`)."""
    shape = {**study.shape, "status": "ok", "reason": ""}
    ld = study.baseline_summary().set_index("metric").loc["logit_diff"]
    rows = [{**shape, "measure": "logit_diff", "value": ld["mean"], "ci_low": ld.ci_low, "ci_high": ld.ci_high,
             "unit": "logit", "verdict": ""}]
    found = claims_table.claims(study, only=SIZE_CLAIMS)
    for r in found.itertuples(index=False):
        rows.append({**shape, "measure": r.claim_id, "value": r.value, "ci_low": r.ci_low, "ci_high": r.ci_high,
                     "unit": r.unit, "verdict": r.verdict})
    return rows


def size_trend(sweep: pd.DataFrame, family: str) -> pd.DataFrame:
    """Per measure, between the smallest and the largest size of `family` that ran: "rises" or
    "falls" where their 95% intervals do not overlap, "no clear change" where they do; a measure
    without intervals compares its verdicts ("same verdict" or "verdict changes")."""
    ran = sweep[(sweep.family == family) & (sweep.status == "ok")]
    sizes = ran.drop_duplicates("model").sort_values("n_params").model.tolist()
    if len(sizes) < 2:
        return pd.DataFrame(columns=["measure", "small", "large", "change"])
    small, large = (ran[ran.model == m].set_index("measure") for m in (sizes[0], sizes[-1]))
    rows = []
    for measure in small.index.intersection(large.index):
        a, b = small.loc[measure], large.loc[measure]
        if pd.isna(a.ci_low) or pd.isna(b.ci_low):
            change = "same verdict" if a.verdict == b.verdict else "verdict changes"
        elif b.ci_low > a.ci_high:
            change = "rises"
        elif b.ci_high < a.ci_low:
            change = "falls"
        else:
            change = "no clear change"
        rows.append({"measure": measure, "small": sizes[0], "large": sizes[-1], "small_value": a.value,
                     "large_value": b.value, "small_verdict": a.verdict, "large_verdict": b.verdict, "change": change})
    return pd.DataFrame(rows)


def relative_depth(layer, n_layers: int):
    """A layer's position in the stack: 0 for the first layer, 1 for the last."""
    return np.asarray(layer) / max(n_layers - 1, 1)


# --- Follow-up 2: template ----------------------------------------------------------------------


def template_sweep(
    study: Study, n_per_template: int = N_PER_TEMPLATE, circuit: criteria.Circuit | None = None,
    release_first: Sequence[Study | None] = (),
) -> pd.DataFrame:
    """Baseline and circuit faithfulness of `study`'s model on each of the 30 templates, then
    pooled by name order.

    The circuit is fixed before the sweep: `circuit`, or else the one `study` reports
    (`Study.circuit()`: the paper's 26 heads on GPT-2 small, a found circuit elsewhere). Only the
    template varies; every template gets `n_per_template` prompts drawn with the study's seed, in
    a variant of the study that borrows its model (`Study.variant`); the models of the other
    studies in `release_first` are let go first. Rows: `level` "template" (one per template),
    "order" (ABBA and BABA pooled) and "difference" (ABBA minus BABA, bootstrap CI)."""
    for other in release_first:
        if other is not None and other is not study:
            other.release_model()
    circuit = study.circuit() if circuit is None else circuit
    n_templates = 2 * len(load_distribution().baba_templates)  # each BABA and its ABBA version
    per_template = study.variant(n=n_per_template * n_templates, templates="full")
    per_prompt = prompt_faithfulness(per_template, circuit)
    seed = study.config.seed
    rows = template_rows(per_prompt, seed) + order_rows(per_prompt, seed)
    frame = pd.DataFrame(rows).astype({"template_id": "Int64"})  # pooled rows have none
    return frame.assign(model=study.config.model, circuit_size=len(circuit.heads))


def prompt_faithfulness(study: Study, circuit: criteria.Circuit) -> pd.DataFrame:
    """Per prompt: template, order, F(C) (only the circuit, the rest mean-ablated per template)
    and F(M) (the whole model), as in `ioi.circuits.criteria.faithfulness_by_template`."""
    return study.prompt_faithfulness(circuit)


def _summary(frame: pd.DataFrame, seed: int) -> dict:
    """Logit difference (BCa CI) and faithfulness F(C)/F(M) (paired bootstrap CI) of prompts."""
    f_c, f_m = frame.F_C.to_numpy(), frame.F_M.to_numpy()
    ld_low, ld_high = bootstrap_ci(f_m, seed)
    low, high = criteria.ratio_ci(f_c, f_m, seed) if len(frame) > 1 else (np.nan, np.nan)
    return {
        "n": len(frame),
        "logit_diff_mean": float(f_m.mean()),
        "logit_diff_ci_low": ld_low,
        "logit_diff_ci_high": ld_high,
        "faithfulness": float(f_c.mean() / f_m.mean()),
        "faithfulness_ci_low": low,
        "faithfulness_ci_high": high,
    }


def template_rows(per_prompt: pd.DataFrame, seed: int = 0) -> list[dict]:
    """One row per template (the numbers `ioi.circuits.criteria.faithfulness_by_template` gives)."""
    return [
        {"level": "template", "template_id": int(t), "order": frame.order.iloc[0], **_summary(frame, seed)}
        for t, frame in per_prompt.groupby("template_id")
    ]


def order_rows(per_prompt: pd.DataFrame, seed: int = 0) -> list[dict]:
    """ABBA and BABA prompts pooled, and the difference ABBA minus BABA with a 95% bootstrap
    interval (prompts resampled within each order, independently)."""
    by_order = {o: per_prompt[per_prompt.order == o] for o in ("ABBA", "BABA")}
    rows = [{"level": "order", "template_id": None, "order": o, **_summary(f, seed)} for o, f in by_order.items() if len(f)]
    if all(len(f) > 1 for f in by_order.values()):
        rows.append(_difference_row(by_order["ABBA"], by_order["BABA"], seed))
    return rows


def _difference_row(abba: pd.DataFrame, baba: pd.DataFrame, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    draws = {}
    for name, frame in (("ABBA", abba), ("BABA", baba)):
        idx = rng.integers(0, len(frame), size=(BOOTSTRAP_RESAMPLES, len(frame)))
        f_c, f_m = frame.F_C.to_numpy()[idx].mean(1), frame.F_M.to_numpy()[idx].mean(1)
        draws[name] = (f_c / f_m, f_m)
    faith = draws["ABBA"][0] - draws["BABA"][0]
    ld = draws["ABBA"][1] - draws["BABA"][1]
    point = lambda f: (f.F_C.mean() / f.F_M.mean(), f.F_M.mean())  # noqa: E731
    (fa, la), (fb, lb) = point(abba), point(baba)
    return {
        "level": "difference", "template_id": None, "order": "ABBA-BABA", "n": len(abba) + len(baba),
        "logit_diff_mean": float(la - lb),
        "logit_diff_ci_low": float(np.percentile(ld, 2.5)),
        "logit_diff_ci_high": float(np.percentile(ld, 97.5)),
        "faithfulness": float(fa - fb),
        "faithfulness_ci_low": float(np.percentile(faith, 2.5)),
        "faithfulness_ci_high": float(np.percentile(faith, 97.5)),
    }


# --- The extension: the study's circuit's classes, against GPT-2 small's ----------------------


def circuit_classes(study: Study) -> pd.DataFrame:
    """The study's circuit's heads by class, with each head's relative depth."""
    frame = study.circuit().to_frame()
    return frame.assign(relative_depth=relative_depth(frame.layer, study.shape["n_layers"]))


def class_comparison(found: pd.DataFrame, model: str) -> pd.DataFrame:
    """Per class: heads and mean relative depth in the paper's GPT-2 small circuit and in a
    circuit found the paper's way (from `circuit_classes`). The paper's was judged head by head,
    the found one with a fixed threshold per step, so counts compare procedures as much as models."""
    paper = criteria.load_circuit().to_frame()
    paper = paper.assign(relative_depth=relative_depth(paper.layer, 12))
    parts = []
    for label, frame in (("gpt2-small (Wang et al.)", paper), (f"{model} (paths)", found)):
        grouped = frame.groupby("class").agg(heads=("layer", "size"), mean_relative_depth=("relative_depth", "mean"))
        parts.append(grouped.reset_index().assign(model=label))
    return pd.concat(parts, ignore_index=True)


def top_heads_by_score(study: Study, k: int = 3) -> pd.DataFrame:
    """For each of the paper's attention scores, the k highest-scoring heads in the whole
    model (in the circuit or not): where induction, duplicate-token and previous-token heads
    (on repeated random tokens) and S-inhibition-like (END->S2) heads sit."""
    scores = study.head_scores()
    rows = []
    for score in ("duplicate_token_random", "previous_token_random", "induction_random", "end_to_s", "end_to_io"):
        for _, r in scores.nlargest(k, score).iterrows():
            rows.append({"score": score, "layer": int(r.layer), "head": int(r["head"]), "value": float(r[score]),
                         "relative_depth": float(relative_depth(r.layer, study.shape["n_layers"]))})
    return pd.DataFrame(rows)


# --- The second family -----------------------------------------------------------------------------


def second_study(model: str, main: Study, n: int, n_path: int) -> tuple[Study | None, Exception | None]:
    """The Study of the second family's model, or (None, why not): a follow-up never repeats the
    main study's model, and a model that is unknown or cannot be loaded here, or that the fast
    engines do not compute exactly (the hook references would take hours), is reported, not
    raised, so the report can say so in a sentence. The main study's model is let go first, so
    that loading the second (twice its resident size at its peak) does not stack on it; an
    analysis of the main study that needs it again loads it again."""
    from ioi.engines.check import unsupported_error

    if not model or model == main.config.model:
        return None, None
    main.release_model()
    try:
        study = Study(StudyConfig(model=model, n=n, seed=main.config.seed, n_path=min(n, n_path)))
    except (ModelUnavailableError, ValueError) as error:
        return None, error
    error = unsupported_error(study.unsupported_features, model)
    return (None, error) if error is not None else (study, None)
