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
from ioi.models import ModelUnavailableError
from ioi.study import Study, StudyConfig


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StudyConfig()
    parser.add_argument("--model", default=defaults.model, help="a known model name or a local Hugging Face directory")
    parser.add_argument("--n", type=int, default=defaults.n, help="number of prompts")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--templates", default=defaults.templates, choices=["mixed", "full", "baba", "abba"])
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=defaults.prepend_bos,
                        help="prepend a BOS token (the paper does not)")
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
    "circuit": lambda s: s.circuit().to_frame(),
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

    p = sub.add_parser("patch", help="activation patching sweeps")
    p.add_argument("what", choices=sorted(PATCHING))
    add_study_arguments(p)
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("path", help="path patching sweeps over sender heads")
    p.add_argument("receivers", choices=sorted(PATHS))
    add_study_arguments(p)
    p.set_defaults(func=cmd_path)

    p = sub.add_parser("reproduce", help="every analysis on one model: tables, figures, summary")
    add_study_arguments(p)
    p.add_argument("--out", required=True, help="directory for the CSV tables, figures and summary.json")
    p.set_defaults(func=cmd_reproduce)

    bench.register(sub)
    followups.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ModelUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
