"""`python -m ioi reproduce`: every analysis of the study on one model, written to a directory.

Each table goes to `DIR/tables/NAME.csv`, each figure to `DIR/figures/NAME.svg`, and
`DIR/summary.json` holds the headline numbers, the setup, how long each analysis took, and
(`not_run`) the experiments the model's circuit gave nothing to act on (no name movers to
knock out, say).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from tqdm.auto import tqdm

from ioi import claims_table
from ioi.atomic import atomic_path
from ioi.report import figures
from ioi.study import Study

TABLES = {
    "baseline": lambda s: s.baseline(),
    "baseline_summary": lambda s: s.baseline_summary(),
    "head_attributions": lambda s: s.head_attributions(),
    "layer_attributions": lambda s: s.layer_attributions(),
    "logit_lens": lambda s: s.logit_lens(),
    "residual_patching": lambda s: s.residual_patching(),
    "layer_patching": lambda s: s.layer_patching(),
    "head_patching": lambda s: s.head_patching("all"),
    "head_patching_end": lambda s: s.head_patching("end"),
    "head_scores": lambda s: s.head_scores(),
    "circuit": lambda s: s.circuit().to_frame(),
    "head_input_patching": lambda s: s.head_input_patching(),
    "path_patching_to_logits": lambda s: s.path_patching_to_logits(),
    "path_patching_to_name_movers": lambda s: s.path_patching_to_name_movers(),
    "path_patching_to_s_inhibition": lambda s: s.path_patching_to_s_inhibition(),
    "path_patching_to_induction": lambda s: s.path_patching_to_induction(),
    "faithfulness_by_template": lambda s: s.faithfulness_by_template(),
    "completeness": lambda s: s.completeness(),
    "minimality": lambda s: s.minimality(),
    "paper_circuit_table": lambda s: s.paper_circuit_table(),
    "faithfulness_curve": lambda s: s.faithfulness_curve(),
    "faithfulness_curve_summary": lambda s: s.faithfulness_curve_summary(),
    "smallest_circuit": lambda s: s.smallest_circuit(),
    "backup": lambda s: s.backup(),
    "name_mover_attention": lambda s: s.name_mover_attention(),
    "position_token": lambda s: s.position_token(),
    "extra_io": lambda s: s.extra_io(),
    "mlp_knockout": lambda s: s.mlp_knockout(),
    "claims": lambda s: claims_table.claims(s).drop(columns=["text"]),
}


def reproduce(study: Study, out: Path) -> dict:
    """Run every analysis (cached), write tables, figures and a summary; return the summary."""
    start = time.perf_counter()
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    nothing_to_act_on = []  # experiments on a class the model's circuit has no member of
    for name, analysis in tqdm(TABLES.items(), desc=f"reproducing on {study.config.model}"):
        table = analysis(study)
        if table is None:
            nothing_to_act_on.append(name)
        else:
            _write_atomically(out / "tables" / f"{name}.csv", table.to_csv(index=False))
    for name, chart in figures.study_figures(study).items():
        chart.save(str(out / "figures" / f"{name}.svg"))
    summary = {
        "setup": study.setup(),
        "baseline": study.baseline_json(),
        "faithfulness": study.faithfulness(),
        "not_run": nothing_to_act_on,
        "seconds": round(time.perf_counter() - start, 2),
        "seconds_per_analysis": {k: round(v, 2) for k, v in study.timings.items()},
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # KiB on Linux
    }
    _write_atomically(out / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def _write_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as staging:
        staging.write_text(text)
