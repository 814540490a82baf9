"""An on-disk results cache whose key changes whenever anything that affects a result changes.

The key hashes the analysis name, its parameters, the model (its name and every weight), the
dataset (its tokens, positions and answers) and the code (this package's source, its data
files, and the versions of torch, transformers and TransformerLens). A stale result therefore
has a different key and is never served. Entries are written to a temporary file and renamed,
so a crash leaves no half-written entry; an entry that cannot be read is recomputed.
Results live in `$IOI_RESULTS_DIR`, else in `results/` under the cache root (see
`ioi.weights.cache_root`). Set IOI_NO_CACHE=1 to bypass the cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

import joblib
import torch

from ioi.atomic import atomic_path
from ioi.dataset import DATA_DIR, IOIDataset
from ioi.weights import cache_root

PACKAGE_DIR = Path(__file__).resolve().parent


def _hash(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model) -> str:
    """The model's name and a digest of all its weights: for a model built in memory, which has
    no files to digest (`ioi.weights.fingerprint`); a study computes it once, with its inputs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    return f"{getattr(model, 'ioi_name', type(model).__name__)}:{digest.hexdigest()}"


def dataset_fingerprint(dataset: IOIDataset) -> str:
    parts = [dataset.tokens, dataset.io_token, dataset.s_token, *dataset.positions.values()]
    return _hash(dataset.prepend_bos, dataset.template_id.tobytes(), *map(_tensor_bytes, parts))


# Code that only presents results (charts, prose, the command line) or judges them (the claims'
# rules, applied afresh to cached results and never cached) cannot change a cached result, so
# editing it does not invalidate the cache; everything else does.
PRESENTATION = ("report", "cli.py", "bench.py", "reproduce.py", "__main__.py", "claims.py", "claims_table.py")


def compute_files() -> list[Path]:
    """The package's source files that can change a computed result, and the data they read."""
    files = [f for f in sorted(PACKAGE_DIR.rglob("*.py"))
             if f.relative_to(PACKAGE_DIR).parts[0] not in PRESENTATION]
    # the claims' rules and sentences are applied afresh to cached results, never cached
    data = [f for f in sorted(DATA_DIR.rglob("*.json")) if f.name != "claims.json"]
    return files + data


@functools.lru_cache(maxsize=1)  # once per process: a run is not changed by later edits
def code_fingerprint() -> str:
    files = compute_files()
    versions = [version(p) for p in ("torch", "transformers", "transformer-lens")]
    return _hash(*versions, *(f.read_bytes() for f in files))


def result_key(analysis: str, params: dict, model=None, datasets=()) -> str:
    return _hash(
        analysis,
        json.dumps(params, sort_keys=True, default=str),
        model if isinstance(model, str) else model_fingerprint(model) if model is not None else "",
        *map(dataset_fingerprint, datasets),
        code_fingerprint(),
    )


def cached(analysis: str, compute, params: dict, model=None, datasets=()):
    """`compute()`'s result, from the cache when an entry for exactly these inputs exists.
    `model`: a model, or its fingerprint (`model_fingerprint`, `ioi.weights.fingerprint`)."""
    if os.environ.get("IOI_NO_CACHE") == "1":
        return compute()
    root = Path(os.environ.get("IOI_RESULTS_DIR", cache_root() / "results"))
    path = root / analysis / f"{result_key(analysis, params, model, datasets)}.joblib"
    if path.exists():
        try:
            return joblib.load(path)
        except Exception:  # unreadable or truncated: recompute rather than serve it
            path.unlink(missing_ok=True)
    result = compute()
    with atomic_path(path) as staging:
        joblib.dump(result, staging)
    return result
