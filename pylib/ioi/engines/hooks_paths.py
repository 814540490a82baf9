"""Path patching (Wang et al. 2022 §3 and Appendix B; Goldowsky-Dill et al. 2023).

Activation patching asks whether a head matters; path patching asks whether it matters *through
a given path*, e.g. whether an S-inhibition head matters because it changes what the name
movers' queries read. For sender heads h and receivers R (chosen heads' queries, keys or values,
or the logits):

1. Run the clean and the corrupted (ABC) prompts and cache every head's output.
2. Run the clean prompts again with the senders' outputs set to their ABC values and every
   other head's output frozen to its clean value, so the change can only travel from the
   senders to R directly (MLPs are recomputed, as in the paper). Cache R's inputs.
3. Run the clean prompts with only R's inputs replaced by those cached in step 2, and read the
   logit difference. When R is the logits, step 2's own output is the answer.

The result is the logit difference after patching, and its change relative to the clean logit
difference (the paper's "% change"): strongly negative means the path carries the task.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ioi.dataset import IOIDataset
from ioi.metrics import logit_diff_from_end, run_end_logits
from ioi.engines.hooks import input_head, run_with_cache

Head = tuple[int, int]  # (layer, head)


def _empty() -> pd.DataFrame:
    """A sweep with no senders, typed like a full one."""
    return pd.DataFrame({"layer": pd.Series(dtype=int), "head": pd.Series(dtype=int),
                         "logit_diff": pd.Series(dtype=float), "relative_change": pd.Series(dtype=float)})


def _z_hooks(model) -> list[str]:
    return [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]


def path_patch(
    model,
    clean: IOIDataset,
    corrupted: IOIDataset,
    senders: Sequence[Head],
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "q",
    receiver_position: str | None = None,
    caches: tuple | None = None,
) -> torch.Tensor:
    """Per-prompt logit difference after patching the path senders -> receivers.

    `receivers` is "logits" or a list of (layer, head) whose `receiver_input` ("q", "k" or
    "v") is patched, at every position or only at `receiver_position` (e.g. "END")."""
    ld, _ = path_patch_cache(model, clean, corrupted, senders, receivers, receiver_input, receiver_position, caches=caches)
    return ld


def path_patch_cache(
    model,
    clean: IOIDataset,
    source: IOIDataset,
    senders: Sequence[Head],
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "q",
    receiver_position: str | None = None,
    names: Sequence[str] = (),
    caches: tuple | None = None,
) -> tuple[torch.Tensor, dict]:
    """`path_patch` with the senders' outputs taken from `source` (the ABC prompts, or any
    prompts aligned with the clean ones: the same length and END), returning the per-prompt
    logit difference and the activations `names` of the final, patched run (e.g. the
    receivers' attention patterns)."""
    clean_z, source_z = caches or (_z_cache(model, clean), _z_cache(model, source))
    senders = set(senders)

    # Step 2: senders from the source, every other head frozen to clean.
    def frozen(rows: slice) -> list:
        def freeze(z, hook):
            layer = hook.layer()
            z = clean_z[hook.name][rows].clone()
            for l, h in senders:
                if l == layer:
                    z[:, :, h] = source_z[hook.name][rows, :, h]
            return z

        return [(name, freeze) for name in _z_hooks(model)]

    if receivers == "logits":
        end_logits, stored = run_with_cache(model, clean, names, frozen)
        return logit_diff_from_end(end_logits, clean.io_token, clean.s_token), stored

    inputs = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers})
    _, receiver_inputs = run_with_cache(model, clean, inputs, frozen)

    # Step 3: only the receivers' inputs patched, everything else recomputed.
    def patched(rows: slice) -> list:
        def patch(act, hook):
            act = act.clone()
            new = receiver_inputs[hook.name][rows]
            for l, h in receivers:
                if l != hook.layer():
                    continue
                h = input_head(model.cfg, h, receiver_input)
                if receiver_position is None:
                    act[:, :, h] = new[:, :, h]
                else:
                    at = clean.positions[receiver_position][rows]
                    items = torch.arange(len(at))
                    act[items, at, h] = new[items, at, h]
            return act

        return [(name, patch) for name in inputs]

    end_logits, stored = run_with_cache(model, clean, names, patched)
    return logit_diff_from_end(end_logits, clean.io_token, clean.s_token), stored


def _z_cache(model, dataset: IOIDataset) -> dict:
    _, cache = run_with_cache(model, dataset, _z_hooks(model))
    return {name: cache[name] for name in _z_hooks(model)}


def path_patching(
    model,
    clean: IOIDataset,
    corrupted: IOIDataset,
    receivers: Sequence[Head] | str = "logits",
    receiver_input: str = "q",
    receiver_position: str | None = None,
    first_layer: int = 0,
) -> pd.DataFrame:
    """Each head in turn as the single sender (only heads in layers before every receiver, and
    from `first_layer` on).
    One row per sender: mean logit difference and its change relative to the clean run."""
    if receivers != "logits" and not receivers:  # e.g. a found circuit without name movers
        return _empty()
    caches = (_z_cache(model, clean), _z_cache(model, corrupted))
    clean_ld = logit_diff_from_end(run_end_logits(model, clean), clean.io_token, clean.s_token).mean().item()
    last = model.cfg.n_layers if receivers == "logits" else min(l for l, _ in receivers)
    senders = [(l, h) for l in range(first_layer, last) for h in range(model.cfg.n_heads)]
    if not senders:  # receivers in layer 0: no head lies before them
        return _empty()
    rows = []
    for sender in tqdm(senders, desc="path patching", leave=False):
        ld = path_patch(
            model, clean, corrupted, [sender], receivers, receiver_input, receiver_position, caches
        ).mean().item()
        rows.append({"layer": sender[0], "head": sender[1], "logit_diff": ld})
    out = pd.DataFrame(rows)
    out["relative_change"] = (out.logit_diff - clean_ld) / clean_ld
    return out
