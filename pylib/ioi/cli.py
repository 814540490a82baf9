"""`python -m ioi`: the study's analyses from the command line.

    python -m ioi baseline --model smollm2-135m --n 200 --seed 0 --json
    python -m ioi patch heads --model gpt2-small --n 100
    python -m ioi reproduce --model smollm2-135m --out results/smollm2-135m

Every subcommand takes --model, --n, --seed, --device, --bos and --json, and goes through
`ioi.study.Study`, so its results land in (and come from) the same cache as the report's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ioi import bench, followups
from ioi.weights import ModelUnavailableError
from ioi.study import Study, StudyConfig


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StudyConfig()
    parser.add_argument("--model", default=defaults.model, help="a known model name or a local Hugging Face directory")
    parser.add_argument("--n", type=int, default=defaults.n, help="number of prompts")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--templates", default=defaults.templates, choices=["mixed", "full", "baba", "abba"])
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=defaults.prepend_bos,
                        help="prepend a BOS token (default: the model's convention; none for GPT-2, as in the paper)")
    parser.add_argument("--n-path", type=int, default=defaults.n_path, help="prompts for path patching")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def study_from(args) -> Study:
    return Study(StudyConfig(
        model=args.model, n=args.n, seed=args.seed, templates=args.templates,
        prepend_bos=args.bos, n_path=min(args.n_path, args.n), device=args.device,
    ))


def emit(result, as_json: bool) -> None:
    if isinstance(result, pd.DataFrame):
        print(result.to_json(orient="records") if as_json else result.to_string(index=False))
    else:
        print(json.dumps(result, default=float, indent=None if as_json else 2))


# --- Subcommands ------------------------------------------------------------------------------

ANALYSES = {
    "dla": lambda s: s.head_attributions(),
    "dla-layers": lambda s: s.layer_attributions(),
    "logit-lens": lambda s: s.logit_lens(),
    "scores": lambda s: s.head_scores(),
    "faithfulness": lambda s: s.faithfulness(),
    "faithfulness-by-template": lambda s: s.faithfulness_by_template(),
    "completeness": lambda s: s.completeness(),
    "minimality": lambda s: s.minimality(),
}
PATCHING = {
    "resid": lambda s: s.residual_patching(),
    "layers": lambda s: s.layer_patching(),
    "heads": lambda s: s.head_patching("all"),
    "heads-end": lambda s: s.head_patching("end"),
    "head-inputs": lambda s: s.head_input_patching(),
}
PATHS = {
    "logits": lambda s: s.path_patching_to_logits(),
    "name-movers": lambda s: s.path_patching_to_name_movers(),
    "s-inhibition": lambda s: s.path_patching_to_s_inhibition(),
}


def cmd_baseline(args) -> None:
    emit(study_from(args).baseline_json(), args.json)


def cmd_analysis(args) -> None:
    emit(ANALYSES[args.analysis](study_from(args)), args.json)


def cmd_patch(args) -> None:
    emit(PATCHING[args.what](study_from(args)), args.json)


def cmd_path(args) -> None:
    emit(PATHS[args.receivers](study_from(args)), args.json)


def cmd_claims(args) -> None:
    """One row per structural claim, with its verdict and the sentence the verdict picked."""
    from ioi import claims_table
    from ioi.report import scorecard

    frame = claims_table.claims(study_from(args))
    sentences = [str(s) for s in scorecard.claim_sentences(frame).values()]
    emit(frame.drop(columns=["text"]).assign(sentence=sentences), args.json)


def circuit_rows(study: Study, method: str | None) -> pd.DataFrame:
    """One row per circuit head with its class and kept position; for the paper-way circuit also
    the step that found it, its path effect and its score check. Without a method: the study's
    circuit (the paper's 26 heads on GPT-2 small, the paper-way circuit elsewhere)."""
    if method == "topk":
        table = study.smallest_circuit()
        return table[table.in_circuit].assign(position="ALL")
    if method is None and study.config.model == "gpt2-small":
        return study.circuit().to_frame()
    table = study.paper_circuit_table()
    kept = table[table.kept].drop(columns=["kept"])
    return study.paper_circuit().to_frame().merge(kept, on=["class", "layer", "head"])


def cmd_circuit(args) -> None:
    emit(circuit_rows(study_from(args), args.method), args.json)


def cmd_curve(args) -> None:
    study = study_from(args)
    if args.json:
        emit(study.faithfulness_curve(), True)
    else:
        emit(study.faithfulness_curve(), False)
        print()
        emit(study.faithfulness_curve_summary(), False)


def cmd_reproduce(args) -> None:
    from ioi.reproduce import reproduce

    summary = reproduce(study_from(args), Path(args.out))
    emit(summary, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ioi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("baseline", help="logit difference, IO probability and IO > S, with 95%% CIs")
    add_study_arguments(p)
    p.set_defaults(func=cmd_baseline)

    for name in ANALYSES:
        p = sub.add_parser(name, help=f"the {name} analysis")
        add_study_arguments(p)
        p.set_defaults(func=cmd_analysis, analysis=name)

    p = sub.add_parser("circuit", help="the circuit's heads by class (paper's on GPT-2 small, found the paper's way elsewhere)")
    p.add_argument("--method", choices=["paths", "topk"], default=None,
                   help="paths: path patching back from the logits; topk: the fewest heads by attribution patching that keep 80%%")
    add_study_arguments(p)
    p.set_defaults(func=cmd_circuit)

    p = sub.add_parser("curve", help="faithfulness of the top-k heads against k, per ranking and ablation")
    add_study_arguments(p)
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("patch", help="activation patching sweeps")
    p.add_argument("what", choices=sorted(PATCHING))
    add_study_arguments(p)
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("path", help="path patching sweeps over sender heads")
    p.add_argument("receivers", choices=sorted(PATHS))
    add_study_arguments(p)
    p.set_defaults(func=cmd_path)

    p = sub.add_parser("claims", help="the paper's structural claims, tested on the model: one row per claim with its verdict")
    add_study_arguments(p)
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("reproduce", help="every analysis on one model: tables, figures, summary")
    add_study_arguments(p)
    p.add_argument("--out", required=True, help="directory for the CSV tables, figures and summary.json")
    p.set_defaults(func=cmd_reproduce)

    register_bench(sub)
    register_followups(sub)
    return parser


# --- python -m ioi followup ---------------------------------------------------------------------


def _emit_frame(frame: pd.DataFrame, as_json: bool) -> None:
    print(frame.to_json(orient="records") if as_json else frame.to_string(index=False))


def cmd_followup_size(args) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    _emit_frame(followups.size_sweep(models, args.n, args.seed, args.device), args.json)


def cmd_followup_templates(args) -> None:
    study = Study(StudyConfig(model=args.model, n=args.circuit_n, seed=args.seed, device=args.device))
    _emit_frame(followups.template_sweep(study, args.n), args.json)


def register_followups(subparsers) -> None:
    """`python -m ioi followup size | templates`."""
    parser = subparsers.add_parser("followup", help="follow-up experiments: model size, template")
    sub = parser.add_subparsers(dest="followup", required=True)

    p = sub.add_parser("size", help="one row per model and measure: logit difference and the size claims, with CIs and verdicts")
    p.add_argument("--models", default=",".join(followups.QWEN_SIZES), help="comma-separated model names or local directories")
    p.add_argument("--n", type=int, default=followups.N_SIZE, help="prompts per model (the same prompts for models sharing a tokenizer)")
    _followup_arguments(p)
    p.set_defaults(func=cmd_followup_size)

    p = sub.add_parser("templates", help="one row per template, then ABBA and BABA pooled and their difference")
    p.add_argument("--model", default=StudyConfig().model)
    p.add_argument("--n", type=int, default=followups.N_PER_TEMPLATE, help="prompts per template (30 templates)")
    p.add_argument("--circuit-n", type=int, default=StudyConfig().n, help="prompts of the study whose circuit is evaluated")
    _followup_arguments(p)
    p.set_defaults(func=cmd_followup_templates)


def _followup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=StudyConfig().seed)
    p.add_argument("--device", default=StudyConfig().device)
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")


# --- python -m ioi bench ------------------------------------------------------------------------


def register_bench(subparsers) -> None:
    """`python -m ioi bench patching | attribution | scaling | reproduce`."""
    parser = subparsers.add_parser("bench", help="time the fast patching engines")
    which = parser.add_subparsers(dest="bench_command", required=True)

    patching = which.add_parser("patching", help="our head sweep vs TransformerLens's patching")
    _bench_arguments(patching, "gpt2-small-random", 20)
    patching.add_argument("--positions", choices=("all", "end"), default="all")
    patching.set_defaults(func=lambda a: _bench_emit(bench.bench_patching(a.model, a.n, a.positions, a.seed), a))

    attribution = which.add_parser("attribution", help="attribution patching vs the exact sweep")
    _bench_arguments(attribution, "smollm2-135m", 50)
    attribution.add_argument("--components", action="store_true",
                             help="also compare every kind of component (resid, attn/MLP layers, q/k/v)")
    attribution.set_defaults(func=lambda a: _bench_emit(bench.bench_attribution(a.model, a.n, a.seed, a.components), a))

    scaling = which.add_parser("scaling", help="our sweep's time vs prompts and GPT-2 size")
    scaling.add_argument("--ns", type=int, nargs="*", default=[10, 20, 50, 100])
    scaling.add_argument("--sizes", nargs="*", default=list(bench.GPT2_SHAPES), choices=list(bench.GPT2_SHAPES))
    scaling.add_argument("--n", type=int, default=20, help="prompts for the size sweep")
    scaling.add_argument("--positions", choices=("all", "end"), default="all")
    scaling.add_argument("--seed", type=int, default=0)
    scaling.add_argument("--json", action="store_true")
    scaling.set_defaults(
        func=lambda a: _bench_emit(bench.bench_scaling(a.ns, a.sizes, a.n, a.positions, a.seed), a)
    )

    reproduce = which.add_parser("reproduce", help="wall time and peak memory of `reproduce`, cold and warm")
    _bench_arguments(reproduce, "smollm2-135m", 100)
    reproduce.add_argument("--out", help="keep reproduce's tables and summary here (default: a temporary directory)")
    reproduce.set_defaults(func=lambda a: _bench_emit(bench.bench_reproduce(a.model, a.n, a.seed, a.out), a))


def _bench_arguments(parser, model: str, n: int) -> None:
    parser.add_argument("--model", default=model)
    parser.add_argument("--n", type=int, default=n, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON only")


def _bench_emit(result, args) -> None:
    if args.json:
        print(json.dumps(result))
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
