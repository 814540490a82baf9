"""What the S-inhibition heads tell the name movers (Wang et al. 2022 §3.2 and Appendix A).

Path patching finds the S-inhibition heads as senders into the name movers' queries at END.
The paper then shows what the path carries, in two experiments, both run here with the
hook-based path patching of `ioi.engines.hooks_paths` (a few forward passes each):

1. Attention. With the S-inhibition heads' outputs taken from the ABC prompts along the path
   into the name movers' queries, the name movers no longer know which name to avoid: their
   attention from END moves from IO towards S2. `name_mover_attention` reads, per prompt, the
   name movers' mean attention to IO and to S2 with and without the patch.
2. Position and token. The S-inhibition heads' output says which name is repeated both by where
   its first mention stands (position) and by what it is (token). Taking their outputs from
   prompts with S's position flipped (the template's other name order), S's token flipped (IO and
   S exchanged), or both, and patching them along the same path, the paper fits
   logit difference ~ 2.31 * position + 0.99 * token on GPT-2 small: mostly a position signal.
   `position_token` gives the four logit differences per prompt and the two coefficients.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ioi.dataset import IOIDataset, corrupt, swap_order
from ioi.engines.hooks import run_with_cache
from ioi.engines.hooks_paths import path_patch_cache
from ioi.metrics import logit_diff_from_end, run_end_logits

Head = tuple[int, int]


def _patterns(stored, dataset: IOIDataset, movers: list[Head]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: the movers' mean attention from END to IO and to S2."""
    rows, end = torch.arange(len(dataset)), dataset.end
    to_io, to_s2 = [], []
    for layer, head in movers:
        pattern = stored[f"blocks.{layer}.attn.hook_pattern"][:, head]  # [batch query key]
        to_io.append(pattern[rows, end, dataset.positions["IO"]])
        to_s2.append(pattern[rows, end, dataset.positions["S2"]])
    return torch.stack(to_io).mean(0).double().numpy(), torch.stack(to_s2).mean(0).double().numpy()


def name_mover_attention(
    model, clean: IOIDataset, corrupted: IOIDataset, s_inhibition: list[Head], movers: list[Head],
) -> pd.DataFrame:
    """Per prompt: the name movers' mean attention from END to IO and to S2 on the clean run,
    and with the S-inhibition heads' outputs from the ABC run patched into the name movers'
    queries at END (everything else clean)."""
    names = sorted({f"blocks.{layer}.attn.hook_pattern" for layer, _ in movers})
    _, clean_run = run_with_cache(model, clean, names)
    _, patched_run = path_patch_cache(model, clean, corrupted, s_inhibition, movers, "q", "END", names)
    (io_clean, s2_clean), (io_patched, s2_patched) = _patterns(clean_run, clean, movers), _patterns(patched_run, clean, movers)
    return pd.DataFrame({"prompt_index": np.arange(len(clean)), "to_io_clean": io_clean, "to_s2_clean": s2_clean,
                         "to_io_patched": io_patched, "to_s2_patched": s2_patched})


def position_token(model, clean: IOIDataset, tokenizer, s_inhibition: list[Head], movers: list[Head]) -> pd.DataFrame:
    """Per prompt: the logit difference with the S-inhibition heads' outputs (into the name
    movers' queries at END) taken from prompts whose S position (pos) and S token (tok) are as in
    the clean prompt (+1) or flipped (-1), and the coefficients of
    logit difference = a * pos + b * tok fitted to the four, prompt by prompt (a, b)."""
    order_flipped = swap_order(clean, tokenizer)
    sources = {
        (1, 1): clean,
        (-1, 1): order_flipped,
        (1, -1): corrupt(clean, tokenizer, "swap_io_s"),
        (-1, -1): corrupt(order_flipped, tokenizer, "swap_io_s"),
    }
    clean_ld = logit_diff_from_end(run_end_logits(model, clean), clean.io_token, clean.s_token)
    cells = {}
    for (pos, tok), source in sources.items():
        if source is clean:
            cells[(pos, tok)] = clean_ld
        else:
            cells[(pos, tok)], _ = path_patch_cache(model, clean, source, s_inhibition, movers, "q", "END")
    ld = {key: value.double().numpy() for key, value in cells.items()}
    # least squares over the four cells of (pos, tok) in {+1, -1}^2, no intercept, as in App. A
    a = sum(pos * v for (pos, _), v in ld.items()) / 4
    b = sum(tok * v for (_, tok), v in ld.items()) / 4
    return pd.DataFrame({"prompt_index": np.arange(len(clean)), "ld_pos_tok": ld[(1, 1)],
                         "ld_flip_pos": ld[(-1, 1)], "ld_flip_tok": ld[(1, -1)], "ld_flip_both": ld[(-1, -1)],
                         "a": a, "b": b})
