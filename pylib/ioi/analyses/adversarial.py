"""Adversarial prompts designed from the circuit (Wang et al. 2022, Fig. 8).

If the model finds IO by noticing that S is the repeated name, an extra mention of IO should
confuse it: the duplicate-token and induction heads then fire on IO too, the S-inhibition heads
inhibit both names, and the name movers lose their cue. The paper inserts two short sentences
naming IO (`data/adversarial.json`) and finds GPT-2 small's logit difference falls from 3.55 to
1.23, IO's probability from 0.49 to 0.36, and S beats IO on 23.4% of prompts. We run the same
prompts with and without the sentences, so the fall is measured prompt by prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ioi.dataset import DATA_DIR, IOIDataset, with_extra_io
from ioi.metrics import per_prompt_baseline

ADVERSARIAL_PATH = DATA_DIR / "adversarial.json"


def load_sentences(path: Path = ADVERSARIAL_PATH) -> str:
    return json.loads(Path(path).read_text())["sentences"]


def extra_io(model, clean: IOIDataset, sentences: str | None = None) -> pd.DataFrame:
    """Per prompt whose template has a full stop before S2: the baseline metrics on the prompt
    as it is and with the sentences inserted (columns suffixed _extra_io)."""
    adversarial, kept = with_extra_io(clean, model.tokenizer, sentences or load_sentences())
    columns = ["logit_diff", "io_prob", "io_beats_s"]
    before = per_prompt_baseline(model, clean.subset(pd.Index(range(len(clean))).isin(kept)))
    after = per_prompt_baseline(model, adversarial)
    return pd.concat([
        pd.DataFrame({"prompt_index": kept, "template_id": before.template_id.to_numpy(), "order": before.order.to_numpy(),
                      "prompt_extra_io": after.prompt.to_numpy()}),
        before[columns].reset_index(drop=True),
        after[columns].add_suffix("_extra_io").reset_index(drop=True),
    ], axis=1)
