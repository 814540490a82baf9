"""Follow-up experiments that each change one factor of the study and hold the rest fixed.

1. Model size (`size_sweep`). GPT-2 small, medium, large and XL on the same prompts (all sizes
   share GPT-2's tokenizer, so one seed gives identical prompts): the baseline, the heads that
   act as name movers and negative name movers, whether the strongest path into the name movers'
   queries comes from S-inhibition-like heads, and the smallest circuit the fixed procedure of
   `ioi.circuits.discovery` finds. Published point of comparison: the exhaustive enumeration of the 15
   BABA templates gives mean logit differences 3.79 / 4.18 / 4.68 for small / medium / large.
2. Template (`template_sweep`). One model and one fixed circuit, evaluated on each of the 30
   templates (15 BABA and their ABBA versions) separately. Miller et al. 2024 report that the
   Wang circuit's faithfulness splits by name order on GPT-2 small (ABBA 57-99%, BABA 98-155%),
   so besides one row per template we pool the prompts of each order and bootstrap the
   difference between the two orders.

Both return tidy DataFrames (compute only: their sentences are in `ioi.report.text`, their charts
in `ioi.report.figures`, their command line in `ioi.cli`); models whose weights cannot be had
here become rows with status "skipped" and the reason, and the rest still run.
Every expensive step goes through `Study` or `ioi.cache.cached`, so reruns are served from the
results cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ioi.cache import cached
from ioi.circuits import criteria
from ioi.circuits.discovery import ATTENTION_FLOOR, DIRECT_SHARE
from ioi.dataset import IOIDataset, load_distribution
from ioi.engines import auto
from ioi.metrics import BOOTSTRAP_RESAMPLES, bootstrap_ci
from ioi.models import KNOWN_MODELS, ModelUnavailableError
from ioi.study import Study, StudyConfig

GPT2_SIZES = ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Published architecture of each size, so that skipped sizes still show where they would sit.
GPT2_SHAPES = {
    "gpt2-small": {"n_params": 124e6, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {"n_params": 355e6, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {"n_params": 774e6, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {"n_params": 1558e6, "n_layers": 48, "n_heads": 25},
}
# Exhaustive enumeration of all prompts of the 15 BABA templates, BOS on (mean logit difference).
ENUMERATION_LOGIT_DIFF = {"gpt2-small": 3.79, "gpt2-medium": 4.18, "gpt2-large": 4.68}
MILLER_2024_FAITHFULNESS = {"ABBA": (0.57, 0.99), "BABA": (0.98, 1.55)}  # range over templates
N_SIZE = 100  # prompts per size: the main study's default, so a size's row reuses its cache
N_PATH_SIZE = 50  # prompts for path patching into the name movers
N_SENDERS = 30  # senders screened by head patching; None path-patches every earlier head
N_PER_TEMPLATE = 20  # x 30 templates = 600 prompts: minutes on a laptop CPU for a 135M model


# --- Follow-up 1: model size --------------------------------------------------------------------


def size_sweep(
    models: Sequence[str] = GPT2_SIZES,
    n: int = N_SIZE,
    seed: int = 0,
    n_path: int = N_PATH_SIZE,
    n_senders: int | None = N_SENDERS,
    device: str = "cpu",
) -> pd.DataFrame:
    """One row per model, in the order given; unavailable models are skipped with the reason.

    Everything but the model is fixed: prompts (n, seed, the "mixed" templates, no BOS), the
    name-mover criterion, the path-patching receivers' definition and the circuit procedure."""
    for name in models:
        _check_model_name(name)
    rows = []
    for name in tqdm(models, desc="size sweep"):
        start = time.perf_counter()
        try:
            study = Study(StudyConfig(model=name, n=n, seed=seed, n_path=min(n_path, n), device=device))
        except ModelUnavailableError as error:
            rows.append(_skipped_row(name, error))
            continue
        row = size_row(study, n_senders)
        rows.append({**row, "seconds": round(time.perf_counter() - start, 2)})
    return pd.DataFrame(rows)


def _check_model_name(name: str) -> None:
    """Fail before any model runs when a name is neither known nor a local directory."""
    if name not in KNOWN_MODELS and not Path(name).expanduser().is_dir():
        raise ValueError(f"Unknown model {name!r}. Known models: {', '.join(KNOWN_MODELS)}.")


def _skipped_row(name: str, error: Exception) -> dict:
    return {"model": name, "status": "skipped", "reason": str(error).split("\n")[0], **GPT2_SHAPES.get(name, {})}


def size_row(study: Study, n_senders: int | None = N_SENDERS) -> dict:
    """Everything follow-up 1 reports about one model, from its (cached) Study."""
    model, cfg = study.model, study.model.cfg
    summary = study.baseline_summary().set_index("metric")
    movers = mover_heads(study)
    nm = movers[movers.role == "name mover"]
    neg = movers[movers.role == "negative name mover"]
    path = s_inhibition_paths(study, _heads(nm), n_senders)
    strongest = path.nsmallest(3, "relative_change") if len(path) else path
    found = study._found_circuit_table()
    in_circuit = found[found.in_circuit]
    faith = found_circuit_faithfulness(study)
    return {
        "model": study.config.model,
        "status": "ok",
        "reason": "",
        "n": len(study.clean),
        "n_path": len(study.path_data[0]),
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "logit_diff_mean": summary.loc["logit_diff", "mean"],
        "logit_diff_ci_low": summary.loc["logit_diff", "ci_low"],
        "logit_diff_ci_high": summary.loc["logit_diff", "ci_high"],
        "io_prob_mean": summary.loc["io_prob", "mean"],
        "io_prob_ci_low": summary.loc["io_prob", "ci_low"],
        "io_prob_ci_high": summary.loc["io_prob", "ci_high"],
        "io_beats_s_frac": summary.loc["io_beats_s", "mean"],
        "name_movers": _labels(nm),
        "name_mover_depth": float(nm.relative_depth.mean()) if len(nm) else np.nan,
        "negative_name_movers": _labels(neg),
        "negative_name_mover_depth": float(neg.relative_depth.mean()) if len(neg) else np.nan,
        "s_inhibition_to_nm_effect": float(strongest.relative_change.iloc[0]) if len(strongest) else np.nan,
        "s_inhibition_senders": _labels(strongest),
        "s_inhibition_senders_end_to_s": [round(float(x), 3) for x in strongest.get("end_to_s", [])],
        "circuit_size": len(in_circuit),
        "circuit_share_of_heads": len(in_circuit) / (cfg.n_layers * cfg.n_heads),
        "circuit_faithfulness": faith["faithfulness"],
        "circuit_faithfulness_ci_low": faith["faithfulness_ci_low"],
        "circuit_faithfulness_ci_high": faith["faithfulness_ci_high"],
        "circuit_classes": {c: len(h) for c, h in study.found_circuit().classes.items()},
    }


def _heads(frame: pd.DataFrame) -> list[tuple[int, int]]:
    return [(int(l), int(h)) for l, h in zip(frame.layer, frame["head"])]


def _labels(frame: pd.DataFrame) -> list[str]:
    return [f"{l}.{h}" for l, h in _heads(frame)]


def mover_heads(study: Study) -> pd.DataFrame:
    """Heads that act as (negative) name movers: a direct effect on the logit difference of at
    least `DIRECT_SHARE` of it (positive or negative), and attention from END to IO above both
    `ATTENTION_FLOOR` and END's attention to S2 (the paper's signature: they attend to the
    indirect object and copy it, or, negative, suppress it). Strongest direct effect first."""
    dla = study.head_attributions()[["layer", "head", "mean"]].rename(columns={"mean": "dla"})
    scores = study.head_scores()[["layer", "head", "end_to_io", "end_to_s"]]
    heads = dla.merge(scores, on=["layer", "head"])
    ld = study.baseline().logit_diff.mean()
    direct = heads.dla.abs() >= DIRECT_SHARE * abs(ld)
    attends_io = (heads.end_to_io >= ATTENTION_FLOOR) & (heads.end_to_io > heads.end_to_s)
    movers = heads[direct & attends_io].copy()
    movers["role"] = np.where(movers.dla > 0, "name mover", "negative name mover")
    movers["relative_depth"] = relative_depth(movers.layer, study.model.cfg.n_layers)
    return movers.sort_values("dla", key=abs, ascending=False, ignore_index=True)


def relative_depth(layer, n_layers: int):
    """A layer's position in the stack: 0 for the first layer, 1 for the last."""
    return np.asarray(layer) / max(n_layers - 1, 1)


def s_inhibition_paths(study: Study, movers: list[tuple[int, int]], n_senders: int | None = N_SENDERS) -> pd.DataFrame:
    """Path patching from single sender heads into the name movers' queries at END (the paper's
    test for S-inhibition, §3.2), on the study's first `n_path` prompts.

    Senders are heads in layers before the earliest name mover; with `n_senders` set, only the
    that many of them with the largest all-position head-patching effect (a screen that keeps
    the run affordable on large models, at the price of missing a sender the screen ranks low).
    One row per sender, with its relative change of the logit difference and its END->S2
    attention (S-inhibition heads attend to S2)."""
    if not movers:
        return pd.DataFrame(columns=["layer", "head", "logit_diff", "relative_change", "end_to_s"])
    first = min(l for l, _ in movers)
    candidates = study.head_patching()
    candidates = candidates[candidates.layer < first]
    if n_senders is not None:
        candidates = candidates.assign(size=candidates.patched_metric.abs()).nlargest(n_senders, "size")
    senders = _heads(candidates)
    clean, corrupted = study.path_data
    params = {"movers": movers, "senders": senders, "config": repr(study.config)}
    frame = cached(
        "followup_s_inhibition_paths",
        lambda: _path_sweep(study.model, clean, corrupted, senders, movers),
        params, study.model, (clean, corrupted),
    )
    scores = study.head_scores()[["layer", "head", "end_to_s"]]
    return frame.merge(scores, on=["layer", "head"], how="left")


def _path_sweep(model, clean: IOIDataset, corrupted: IOIDataset, senders, receivers) -> pd.DataFrame:
    """The fast exact path-patching sweep into the receivers' queries at END, kept to `senders`."""
    frame = auto.path_patch_sweep(model, clean, corrupted, receivers, "q", "END")
    keep = {tuple(s) for s in senders}
    return frame[[(l, h) in keep for l, h in zip(frame.layer, frame["head"])]].reset_index(drop=True)


def found_circuit_faithfulness(study: Study) -> dict:
    """Faithfulness (with its CI) of the circuit `ioi.circuits.discovery` finds, on the study's prompts."""
    found = study.found_circuit()
    if sorted(study.circuit().heads) == sorted(found.heads):
        return study.faithfulness()  # the study's own circuit: share its cache entry
    return cached(
        "followup_found_circuit_faithfulness",
        lambda: criteria.faithfulness(study.model, found, study.clean, study.corrupted, study.config.seed),
        {"config": repr(study.config), "heads": found.heads}, study.model, (study.clean, study.corrupted),
    )


# --- Follow-up 2: template ----------------------------------------------------------------------


def template_sweep(
    model: str = "gpt2-small",
    n_per_template: int = N_PER_TEMPLATE,
    seed: int = 0,
    circuit: criteria.Circuit | None = None,
    circuit_n: int = StudyConfig().n,
    device: str = "cpu",
) -> pd.DataFrame:
    """Baseline and circuit faithfulness on each of the 30 templates, then pooled by name order.

    The circuit is fixed before the sweep: `circuit`, or else the one the main study reports
    (`Study.circuit()` on `circuit_n` prompts of the default template set: the paper's 26 heads
    on GPT-2 small, a found circuit elsewhere). Only the template varies; every template gets
    `n_per_template` prompts drawn with `seed`. Rows: `level` "template" (one per template),
    "order" (ABBA and BABA pooled) and "difference" (ABBA minus BABA, bootstrap CI)."""
    if circuit is None:
        circuit = Study(StudyConfig(model=model, n=circuit_n, seed=seed, device=device)).circuit()
    n_templates = 2 * len(load_distribution().baba_templates)  # each BABA and its ABBA version
    study = Study(StudyConfig(model=model, n=n_per_template * n_templates, seed=seed, templates="full", device=device))
    per_prompt = prompt_faithfulness(study, circuit)
    rows = template_rows(per_prompt, seed) + order_rows(per_prompt, seed)
    frame = pd.DataFrame(rows).astype({"template_id": "Int64"})  # pooled rows have none
    return frame.assign(model=model, circuit_size=len(circuit.heads))


def prompt_faithfulness(study: Study, circuit: criteria.Circuit) -> pd.DataFrame:
    """Per prompt: template, order, F(C) (only the circuit, the rest mean-ablated per template)
    and F(M) (the whole model), as in `ioi.circuits.criteria.faithfulness_by_template`."""
    model, clean, corrupted = study.model, study.clean, study.corrupted

    def compute() -> pd.DataFrame:
        f_c, f_m = criteria.circuit_and_model(model, circuit, clean, corrupted, None)
        return pd.DataFrame({"template_id": clean.template_id, "order": clean.order, "F_C": f_c, "F_M": f_m})

    params = {"config": repr(study.config), "circuit": circuit.to_frame().to_dict("records")}
    return cached("followup_prompt_faithfulness", compute, params, model, (clean, corrupted))


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
    """The study's circuit's heads by class (found the paper's way, `Study.circuit`), with each
    head's relative depth."""
    frame = study.circuit().to_frame()
    return frame.assign(relative_depth=relative_depth(frame.layer, study.model.cfg.n_layers))


def class_comparison(found: pd.DataFrame, model: str) -> pd.DataFrame:
    """Per class: heads and mean relative depth in the paper's GPT-2 small circuit and in a
    study's circuit (from `circuit_classes`). The paper's was drawn by hand over many experiments,
    the other by a fixed procedure, so counts compare procedures as much as models."""
    paper = criteria.load_circuit().to_frame()
    paper = paper.assign(relative_depth=relative_depth(paper.layer, GPT2_SHAPES["gpt2-small"]["n_layers"]))
    parts = []
    for label, frame in (("gpt2-small (Wang et al.)", paper), (f"{model} (paths)", found)):
        grouped = frame.groupby("class").agg(heads=("layer", "size"), mean_relative_depth=("relative_depth", "mean"))
        parts.append(grouped.reset_index().assign(model=label))
    return pd.concat(parts, ignore_index=True)


def top_heads_by_score(study: Study, k: int = 3) -> pd.DataFrame:
    """For each of the paper's attention scores, the k highest-scoring heads in the whole
    model (found circuit or not): where induction, duplicate-token, previous-token and
    S-inhibition-like (END->S2) heads sit."""
    scores = study.head_scores()
    rows = []
    for score in ("duplicate_token", "previous_token", "induction", "end_to_s", "end_to_io"):
        for _, r in scores.nlargest(k, score).iterrows():
            rows.append({"score": score, "layer": int(r.layer), "head": int(r["head"]), "value": float(r[score]),
                         "relative_depth": float(relative_depth(r.layer, study.model.cfg.n_layers))})
    return pd.DataFrame(rows)
