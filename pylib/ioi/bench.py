"""`ioi bench`: how much faster the exact sweeps of `ioi.engines.fast` and attribution patching are.

- `bench patching`: our head-output sweep against TransformerLens's own activation patching on
  the same model, prompts and metric, in the same process. All positions: against
  `transformer_lens.patching.get_act_patch_attn_head_out_all_pos`. END only: TransformerLens has
  no per-prompt-END sweep (its `..._by_pos` patches one absolute position in every prompt, and
  IOI prompts end at different positions), so the baseline is its `generic_activation_patch`
  over (layer, head) with a patch setter that writes each prompt's END row: the same machinery,
  one bridge forward per head.
- `bench attribution`: attribution patching against our exact all-position sweep.
- `bench scaling`: our sweep's time against the number of prompts and GPT-2's four sizes
  (random weights of each shape: the time depends on the shape, not on the values).
- `bench reproduce`: wall time and peak memory of the whole `reproduce` run, with a cold and
  with a warm results cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ioi.engines import check, fast
from ioi.dataset import corrupt, make_dataset
from ioi.metrics import logit_diff

GPT2_SHAPES = {  # name -> (n_layer, n_head, n_embd)
    "gpt2-small": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def bench_reproduce(model: str = "smollm2-135m", n: int = 100, seed: int = 0, out: str | None = None) -> dict:
    """Run `python -m ioi reproduce` twice in fresh processes sharing one new, empty results
    cache: cold (everything computed) then warm (everything served from the cache). Model
    weights stay in the usual cache, so neither run pays for dequantising or downloading.
    `out`: where `reproduce` writes its tables and summary (kept, to compare them with another
    version's), else a temporary directory."""
    runs = {}
    with tempfile.TemporaryDirectory() as results, tempfile.TemporaryDirectory() as scratch:
        out = out or scratch
        env = {**os.environ, "IOI_RESULTS_DIR": results}
        for label in ("cold", "warm"):
            command = [sys.executable, "-m", "ioi", "reproduce", "--model", model, "--n", str(n),
                       "--seed", str(seed), "--out", out, "--json"]
            start = time.perf_counter()
            child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed ({label} run)")
            runs[f"{label}_s"] = round(time.perf_counter() - start, 1)
            runs[f"{label}_peak_memory_gb"] = round(usage.ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB
            if label == "cold":  # where the time goes
                summary = json.loads((Path(out) / "summary.json").read_text())
                runs["cold_seconds_per_analysis"] = summary["seconds_per_analysis"]
    return {"model": model, "n": n, **runs}


def _pair(model, n: int, seed: int):
    clean = make_dataset(model.tokenizer, n, seed=seed)
    return clean, corrupt(clean, model.tokenizer)


def _load(model_or_name):
    from ioi.models import load_model

    return load_model(model_or_name) if isinstance(model_or_name, str) else model_or_name


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def tl_head_out_baseline(model, clean, corrupted, positions: fast.Positions = "all"):
    """TransformerLens's head-output patching, one bridge forward per head, mean logit diff."""
    import transformer_lens.patching as tlp

    metric = lambda logits: logit_diff(logits, clean).mean()  # noqa: E731
    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(clean.tokens)
    if positions == "all":
        return tlp.get_act_patch_attn_head_out_all_pos(model, corrupted.tokens, clean_cache, metric)
    rows = torch.arange(len(clean))

    def patch_end(corrupted_z, index, clean_z):
        _, head = index
        corrupted_z[rows, clean.end, head] = clean_z[rows, clean.end, head]
        return corrupted_z

    return tlp.generic_activation_patch(
        model, corrupted.tokens, clean_cache, metric, patch_end, "z", index_axis_names=("layer", "head")
    )


TL_BASELINES = {
    "all": "transformer_lens.patching.get_act_patch_attn_head_out_all_pos",
    "end": "transformer_lens.patching.generic_activation_patch over (layer, head), patching hook_z at each prompt's END",
}


def bench_patching(model="gpt2-small-random", n: int = 20, positions: fast.Positions = "all", seed: int = 0) -> dict:
    """Time our head-output sweep and TransformerLens's on the same model and prompts."""
    model = _load(model)
    clean, corrupted = _pair(model, n, seed)
    verdict = check.verify(model, clean, corrupted)  # extracts the weights, not part of a sweep
    if not verdict.fast:
        raise check.UnsupportedModelError(f"{model.ioi_name}: the fast engine is not exact here: {verdict.reason}")
    ours, ours_s = _timed(lambda: fast.head_out_sweep(
        model, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token, positions=positions
    ))
    theirs, baseline_s = _timed(lambda: tl_head_out_baseline(model, clean, corrupted, positions))
    return {
        "model": getattr(model, "ioi_name", type(model).__name__),
        "n": n,
        "positions": positions,
        "baseline": TL_BASELINES[positions],
        "ours_s": ours_s,
        "baseline_s": baseline_s,
        "speedup": baseline_s / ours_s,
        "max_abs_diff": float((ours.double() - theirs.double()).abs().max()),
        "threads": torch.get_num_threads(),
    }


def bench_attribution(model="smollm2-135m", n: int = 50, seed: int = 0, components: bool = False) -> dict:
    """Attribution patching against our exact all-position head sweep; with `components`, also
    against exact patching of every other kind of component (`compare_components`)."""
    from ioi.engines.attribution import compare_components, compare_with_exact

    model = _load(model)
    clean, corrupted = _pair(model, n, seed)
    fast.as_fast(model)
    result = compare_with_exact(model, clean, corrupted)
    if components:
        result["components"] = compare_components(model, clean, corrupted)
    return {"model": getattr(model, "ioi_name", "?"), "n": n, **result}


def random_gpt2(size: str):
    """A bridge with GPT-2 `size`'s shape and seeded random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ioi.models import from_hf_model
    from ioi.weights import gpt2_tokenizer_directory

    n_layer, n_head, n_embd = GPT2_SHAPES[size]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    bridge = from_hf_model(hf, gpt2_tokenizer_directory())
    bridge.ioi_name = f"{size}-shape-random"
    return bridge


def bench_scaling(
    ns=(10, 20, 50, 100), sizes=tuple(GPT2_SHAPES), n: int = 20, positions: fast.Positions = "all", seed: int = 0
) -> list[dict]:
    """Our sweep's time against the number of prompts (GPT-2 small's shape) and model size.
    TransformerLens's sweep is one bridge forward per head, so each row also times one bridge
    forward and gives `baseline_est_s` = that x the number of heads (an estimate, labelled so:
    running it on the large shapes would take hours)."""
    from tqdm import tqdm

    rows = []
    jobs = [("gpt2-small", k) for k in ns] + [(size, n) for size in sizes]
    for size, k in tqdm(jobs, desc="bench scaling", file=sys.stderr):
        model = random_gpt2(size)
        clean, corrupted = _pair(model, k, seed)
        w = fast.as_fast(model)
        with torch.inference_mode():
            _, forward_s = _timed(lambda: model(corrupted.tokens))
        _, seconds = _timed(lambda: fast.head_out_sweep(
            w, clean.tokens, corrupted.tokens, clean.end, clean.io_token, clean.s_token, positions=positions
        ))
        heads = w.n_layers * w.n_heads
        rows.append({
            "shape": size, "n_layers": w.n_layers, "n_heads": w.n_heads, "d_model": w.W_E.shape[1],
            "n": k, "positions": positions, "ours_s": seconds, "per_head_ms": 1000 * seconds / heads,
            "bridge_forward_s": forward_s, "baseline_est_s": forward_s * heads,
            "speedup_est": forward_s * heads / seconds,
        })
        del model, w
    return rows
