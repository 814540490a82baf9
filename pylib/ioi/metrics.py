"""The IOI metrics and the uncertainty we attach to every mean we report.

- logit difference: logit(IO) - logit(S) at END, the paper's main measure (§2);
- IO probability at END, and whether IO's logit beats S's;
- the normalised patching metric, 0 on the corrupted run and 1 on the clean run, so a patch that
  restores 0.3 restores 30% of the clean logit difference;
- bootstrap 95% confidence intervals over prompts (scipy's BCa bootstrap, seeded).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from ioi.dataset import IOIDataset

BOOTSTRAP_RESAMPLES = 2000  # enough for stable 95% limits on a few hundred prompts


def end_logits(
    logits: Float[Tensor, "batch pos d_vocab"], end: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_vocab"]:
    return logits[torch.arange(len(end)), end]


def logit_diff_from_end(
    end_logits: Float[Tensor, "batch d_vocab"],
    io_token: Int[Tensor, " batch"],
    s_token: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    rows = torch.arange(len(io_token))
    return end_logits[rows, io_token] - end_logits[rows, s_token]


def logit_diff(logits: Float[Tensor, "batch pos d_vocab"], dataset: IOIDataset) -> Float[Tensor, " batch"]:
    """logit(IO) - logit(S) at each prompt's END."""
    return logit_diff_from_end(end_logits(logits, dataset.end), dataset.io_token, dataset.s_token)


def normalised(value, clean, corrupted):
    """0 when `value` equals the corrupted run's, 1 when it equals the clean run's."""
    return (value - corrupted) / (clean - corrupted)


@torch.inference_mode()
def run_end_logits(model, dataset: IOIDataset) -> Float[Tensor, "batch d_vocab"]:
    """The model's logits at END for every prompt, in `batches`."""
    return torch.cat([end_logits(model(dataset.tokens[rows]), dataset.end[rows]) for rows in batches(model, dataset)])


LOGITS_BYTES = 256 * 2**20


def batches(model, dataset: IOIDataset) -> list[slice]:
    """Slices of the prompts whose whole-sequence float32 logits fit in `LOGITS_BYTES`: a
    262k-token vocabulary (Gemma 3) makes 2 GB of them for 100 prompts of 20 tokens."""
    per_prompt = dataset.tokens.shape[1] * model.cfg.d_vocab * 4
    size = max(1, LOGITS_BYTES // per_prompt)
    return [slice(start, start + size) for start in range(0, len(dataset), size)]


def per_prompt_baseline(model, dataset: IOIDataset) -> pd.DataFrame:
    """One row per prompt: logit difference, IO and S probability, whether IO beats S."""
    logits = run_end_logits(model, dataset).double()
    probs = logits.softmax(-1)
    rows = torch.arange(len(dataset))
    ld = logit_diff_from_end(logits, dataset.io_token, dataset.s_token)
    return pd.DataFrame(
        {
            "prompt": dataset.prompts,
            "template_id": dataset.template_id,
            "order": dataset.order,
            "logit_diff": ld.numpy(),
            "io_prob": probs[rows, dataset.io_token].numpy(),
            "s_prob": probs[rows, dataset.s_token].numpy(),
            "io_beats_s": (ld > 0).numpy(),
        }
    )


def bootstrap_ci(values, seed: int = 0, statistic=np.mean) -> tuple[float, float]:
    """A 95% BCa bootstrap interval for `statistic` over the values (prompts)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.ptp(values) == 0:
        point = float(statistic(values)) if len(values) else float("nan")
        return point, point
    res = stats.bootstrap(
        (values,),
        statistic,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarise(values, seed: int = 0) -> dict:
    """Mean, its 95% bootstrap interval and the number of prompts."""
    low, high = bootstrap_ci(values, seed)
    return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high, "n": len(values)}


def baseline_summary(per_prompt: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Mean and 95% CI of each baseline metric, one row per metric."""
    rows = []
    for metric in ("logit_diff", "io_prob", "io_beats_s"):
        rows.append({"metric": metric, **summarise(per_prompt[metric].astype(float), seed)})
    return pd.DataFrame(rows)
