"""Shared setup for every chapter, run by each document's hidden first cell as
`exec(open("_setup.py").read())` (the way R for Data Science sources `_common.R`).

The model comes from one place, the env var IOI_MODEL: Quarto's `_environment` file sets it to
gpt2-small, `_environment-offline` (under `quarto render --profile offline`) to smollm2-135m;
IOI_EXTENSION_MODEL names the second family, judged by the same claims beside it.
IOI_N is the number of prompts; IOI_N_PATH and IOI_TOP_HEADS bound the costliest sweeps
(path patching and per-input head patching), which the tests set small.
"""

import os

# Progress bars would reach the notebook as Jupyter widgets, and a page with a widget loads
# require.js, jQuery and the widget manager from a CDN: no bars in a render, and none as widgets.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import tqdm.auto, tqdm.std  # noqa: E401
tqdm.auto.tqdm = tqdm.std.tqdm  # before any library imports it

import altair as alt
import pandas as pd

from ioi import followups
from ioi.circuits import classes
from ioi.circuits.criteria import load_circuit
from ioi.claims_table import claims as structural_claims
from ioi.report import figures, scorecard, tables, text
from ioi.report.figures import show
from ioi.report.text import Md, ci, fmt, heads, pct
from ioi.study import Study, StudyConfig

N = int(os.environ.get("IOI_N", 100))
study = Study(StudyConfig(
    model=os.environ.get("IOI_MODEL", "gpt2-small"),
    n=N,
    n_path=min(N, int(os.environ.get("IOI_N_PATH", StudyConfig.n_path))),
    top_heads=int(os.environ.get("IOI_TOP_HEADS", StudyConfig.top_heads)),
))
setup = {k: Md(v) if isinstance(v, str) else v for k, v in study.setup().items()}  # strings print unquoted inline
circuit = study.circuit()
published_claims = scorecard.load_claims().set_index("claim_id")  # GPT-2 small's published numbers
published = published_claims.published_value
findings = structural_claims(study)  # the paper's findings as claims, each judged on this model
said = scorecard.claim_sentences(findings)  # claim -> the sentence its verdict picked
# The second family (IOI_EXTENSION_MODEL, set per profile in _environment*): its own Study, judged
# by the same claims beside the main model's; None where it cannot run here (`ext_error` says why).
EXTENSION = os.environ.get("IOI_EXTENSION_MODEL", "")
ext_study, ext_error = followups.second_study(EXTENSION, study, N, study.config.n_path)
ext_findings = structural_claims(ext_study) if ext_study is not None else None
on_paper_model = study.config.model == scorecard.PAPER_MODEL
alt.data_transformers.disable_max_rows()  # per-prompt frames can pass altair's 5,000-row guard
text.inline_numbers()  # a stray numpy number prints as 142, not np.int64(142)
