"""What every sweep starts from: a clean and a corrupted run, cached and reused, and the rows a
patch changes carried from its layer to the logit difference at END."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ioi.engines.fast.loaders import as_fast
from ioi.engines.fast.model import Cache, FastModel, logit_diff_at, run_rows, run_with_cache

@dataclass(frozen=True)
class Task:
    """A clean/corrupted pair and both runs' caches: what every sweep starts from."""

    fast: FastModel
    clean: Cache
    corrupted: Cache
    clean_tokens: Tensor
    corrupted_tokens: Tensor
    end: Tensor
    io_token: Tensor
    s_token: Tensor

    @property
    def batch(self) -> int:
        return len(self.end)

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    def first_change(self, prompts: Tensor) -> int:
        return first_change(self.clean_tokens[prompts], self.corrupted_tokens[prompts], self.end[prompts])


def first_change(
    clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"], end: Int[Tensor, " batch"]
) -> int:
    """The first position where any clean and corrupted prompt differ: before it both runs are
    the same, so no patch there (or of anything computed there) changes anything."""
    differs = (clean_tokens != corrupted_tokens).any(0).nonzero()
    return int(differs[0]) if len(differs) else int(end.min())


def reuse_last(compute):
    """Return `compute(fast, *tensors)`'s last result again while it is called with the same
    FastModel and equal tensors (compared by value, against copies). A study runs many sweeps on
    one clean/corrupted pair: they share its cached runs instead of each paying for them (two
    forwards, seconds on a real model). The FastModel keeps one such result (`FastModel.kept`),
    whichever function computed it, and drops it before the next is computed, so it never adds
    to the memory of the next such computation: a cache of a study's size, not of a sweep's. It
    goes with its FastModel, so a released model's runs are freed with its weights."""

    @functools.wraps(compute)
    def wrapper(fast: FastModel, *tensors: Tensor):
        kept = fast.kept
        if not (kept.get("compute") is compute and _equal(kept["tensors"], tensors)):
            kept.clear()
            value = compute(fast, *tensors)
            kept.update(compute=compute, tensors=tuple(t.clone() for t in tensors), value=value)
        return kept["value"]

    return wrapper


def _equal(kept: tuple[Tensor, ...], tensors: tuple[Tensor, ...]) -> bool:
    return len(kept) == len(tensors) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(kept, tensors)
    )


@reuse_last
@torch.inference_mode()
def cached_runs(
    fast: FastModel, clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"]
) -> tuple[Cache, Cache]:
    """The clean and the corrupted run, cached (and reused: see `reuse_last`)."""
    return run_with_cache(fast, clean_tokens), run_with_cache(fast, corrupted_tokens)


def prepare(model_or_fast, clean_tokens, corrupted_tokens, end, io_token, s_token) -> Task:
    fast = as_fast(model_or_fast)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError("clean and corrupted prompts must have the same shape, position by position")
    clean, corrupted = cached_runs(fast, clean_tokens, corrupted_tokens)
    return Task(fast, clean, corrupted, clean_tokens, corrupted_tokens, end, io_token, s_token)


def _rows(task: Task, prompts: Tensor, n_var: int, start: int | None):
    """Which prompt each of n_var x len(prompts) variants belongs to, its rows' positions
    (`start` to the last END, or END alone when start is None) and END's row."""
    prompt = prompts.repeat(n_var)
    end = task.end[prompt]
    if start is None:
        return prompt, end[:, None], torch.zeros_like(end)
    pos = torch.arange(start, int(end.max()) + 1).expand(len(prompt), -1)
    return prompt, pos, (end - start).clamp(min=0)  # END < start: see _logit_diff


def _resid_mid_patched(
    task: Task, layer: int, prompts: Tensor, deltas: Float[Tensor, "variant batch pos d_model"], start: int | None
) -> Float[Tensor, "variant batch"]:
    """Logit difference at END after adding each variant's delta to layer `layer`'s residual
    after attention (a head's or the attention layer's output change) and running on."""
    n_var = deltas.shape[0]
    prompt, pos, end_row = _rows(task, prompts, n_var, start)
    rows = torch.arange(len(prompt))[:, None]
    resid = task.corrupted.resid_mid(layer, (prompt[:, None], pos)) + deltas.flatten(0, 1)[rows, pos]
    final = run_rows(task.fast, task.corrupted, layer, resid, prompt, pos, end_row)
    return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))


def _resid_pre_patched(
    task: Task, layer: int, prompts: Tensor, resid_pre: Float[Tensor, "variant batch pos d_model"], start: int
) -> Float[Tensor, "variant batch"]:
    """Logit difference at END for residual streams before `layer` that differ from the
    corrupted run's at positions >= `start` only."""
    n_var = resid_pre.shape[0]
    prompt, pos, end_row = _rows(task, prompts, n_var, start)
    resid = resid_pre.flatten(0, 1)[torch.arange(len(prompt))[:, None], pos]
    if layer == task.fast.n_layers:
        final = resid[torch.arange(len(prompt)), end_row]
        return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))
    final = run_rows(task.fast, task.corrupted, layer, resid, prompt, pos, end_row, after_attention=False)
    return _logit_diff(task, final, prompt, start).view(n_var, len(prompts))


def _logit_diff(task: Task, final: Tensor, prompt: Tensor, start: int | None) -> Tensor:
    patched = logit_diff_at(task.fast, final, task.io_token[prompt], task.s_token[prompt])
    if start is None:
        return patched
    # a prompt that ends before the patched position is not changed by it
    return torch.where(task.end[prompt] < start, _unpatched(task)[prompt], patched)


def _unpatched(task: Task) -> Float[Tensor, " batch"]:
    final = task.corrupted.resid_final[torch.arange(task.batch), task.end]
    return logit_diff_at(task.fast, final, task.io_token, task.s_token)


def length_groups(end: Int[Tensor, " batch"]) -> list[Int[Tensor, " prompts"]]:
    """Prompts grouped by END, so that no row is spent on another prompt's padding."""
    return [(end == e).nonzero()[:, 0] for e in end.unique()]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
