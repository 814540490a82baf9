"""The results cache: served only for exactly the same inputs, robust to broken entries."""

import pytest
import torch
from conftest import make_pair

from ioi import cache


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IOI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("IOI_NO_CACHE", raising=False)
    return tmp_path


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"value": self.calls}


def test_same_inputs_are_served_from_the_cache(tiny_gpt2):
    clean, corrupted = make_pair(tiny_gpt2, n=4)
    compute = Counter()
    first = cache.cached("analysis", compute, {"k": 1}, tiny_gpt2, (clean, corrupted))
    second = cache.cached("analysis", compute, {"k": 1}, tiny_gpt2, (clean, corrupted))
    assert first == second == {"value": 1} and compute.calls == 1


def test_any_changed_input_changes_the_key(tiny_gpt2, tiny_llama):
    """Parameters, the analysis, the model and the dataset each change the key."""
    clean, _ = make_pair(tiny_gpt2, n=4)
    other, _ = make_pair(tiny_gpt2, n=4, seed=1)
    base = cache.result_key("a", {"k": 1}, tiny_gpt2, (clean,))
    assert base == cache.result_key("a", {"k": 1}, tiny_gpt2, (clean,))
    assert base != cache.result_key("a", {"k": 2}, tiny_gpt2, (clean,))
    assert base != cache.result_key("b", {"k": 1}, tiny_gpt2, (clean,))
    assert base != cache.result_key("a", {"k": 1}, tiny_gpt2, (other,))
    assert base != cache.result_key("a", {"k": 1}, tiny_llama, (clean,))


def test_changed_weights_change_the_fingerprint(tiny_gpt2):
    """Editing one weight in place is a different model as far as the cache is concerned."""
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

    model = Wrapper()
    before = cache.model_fingerprint(model)
    other = Wrapper()
    with torch.no_grad():
        other.w[1] = 1e-6
    assert cache.model_fingerprint(other) != before


def test_unreadable_entry_is_recomputed(fresh_cache):
    compute = Counter()
    cache.cached("analysis", compute, {"k": 1})
    (entry,) = (fresh_cache / "results" / "analysis").glob("*.joblib")
    entry.write_bytes(b"not a joblib file")
    assert cache.cached("analysis", compute, {"k": 1}) == {"value": 2}
    assert cache.cached("analysis", compute, {"k": 1}) == {"value": 2}


def test_a_failed_computation_leaves_nothing_behind(fresh_cache):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.cached("analysis", broken, {})
    assert not list(fresh_cache.rglob("*.joblib")) and not list(fresh_cache.rglob("*.tmp"))


def test_default_and_explicit_arguments_share_one_result(tiny_gpt2):
    """A Study analysis is keyed on its arguments' values, defaults filled in: calling it with
    the default spelled out, or by keyword, is served the same result, computed once."""
    from ioi.study import StudyConfig, _analysis

    calls = []

    class Probe:
        config = StudyConfig(model="probe")
        model = tiny_gpt2
        model_fingerprint = cache.model_fingerprint(tiny_gpt2)
        clean, corrupted = make_pair(tiny_gpt2, n=4)
        timings = {}

        @_analysis
        def sweep(self, positions="all"):
            calls.append(positions)
            return positions

    probe = Probe()
    assert probe.sweep() == probe.sweep("all") == probe.sweep(positions="all") == "all"
    assert probe.sweep("end") == "end"
    assert calls == ["all", "end"]


def test_code_fingerprint_covers_compute_code_and_data_not_presentation():
    """Every engine, analysis and data file keys the cache; charts, prose and the CLI do not."""
    names = {str(f.relative_to(cache.PACKAGE_DIR)) for f in cache.compute_files() if f.suffix == ".py"}
    assert {"study.py", "followups.py", "engines/fast/model.py", "circuits/criteria.py", "dataset.py"} <= names
    assert not any(n.startswith("report/") or n in ("cli.py", "bench.py", "reproduce.py", "claims.py", "claims_table.py") for n in names)
    assert any(f.suffix == ".json" for f in cache.compute_files())


def test_a_cached_study_is_read_without_its_model(tiny_dir, monkeypatch):
    """A study whose results are cached (its datasets and shape included, under the digest of
    the model's files) builds and reads them without loading the model."""
    from ioi import study as study_module
    from ioi.study import Study, StudyConfig

    config = StudyConfig(model=tiny_dir, n=8)
    first = Study(config)
    baseline = first.baseline()
    loads, load = [], study_module.load_model
    monkeypatch.setattr(study_module, "load_model", lambda *args, **kwargs: loads.append(args) or load(*args, **kwargs))
    second = Study(config)
    assert second.baseline().equals(baseline) and second.shape == first.shape and loads == []
    assert second.model.cfg.n_layers == second.shape["n_layers"] and len(loads) == 1  # loaded when asked for


def test_a_study_digests_the_files_it_loads(tiny_dir, monkeypatch):
    """Where the weights come from is resolved once per study: the files digested into every
    result's key are the files the model loads from."""
    from ioi import models, weights
    from ioi import study as study_module
    from ioi.study import Study, StudyConfig

    asked, resolve = [], study_module.source
    monkeypatch.setattr(study_module, "source", lambda name: asked.append(name) or resolve(name))
    for module in (weights, models):
        monkeypatch.setattr(module, "source", lambda name: pytest.fail("the weights' source resolved a second time"))
    study = Study(StudyConfig(model=tiny_dir, n=8))
    assert study.model.cfg.n_layers == study.shape["n_layers"] and asked == [tiny_dir]


@pytest.mark.parametrize("directory", [False, True])
def test_a_failed_write_leaves_nothing(tmp_path, directory):
    """A file or a directory written through `atomic_path` appears whole or not at all."""
    from ioi.atomic import atomic_path

    target = tmp_path / "target"

    def write(staging, text):
        (staging / "content" if directory else staging).write_text(text)

    with pytest.raises(RuntimeError), atomic_path(target, directory) as staging:
        write(staging, "half")
        raise RuntimeError("crashed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target, directory) as staging:
        write(staging, "whole")
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
    assert (target / "content" if directory else target).read_text() == "whole"


def test_changed_files_change_the_model_fingerprint(tiny_dir, tmp_path):
    """Other weights on disk give the model another fingerprint, and so every result another key."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ioi import weights

    changed = tmp_path / "changed"
    shutil.copytree(tiny_dir, changed)
    assert weights.fingerprint(str(changed)).split(":")[1] == weights.fingerprint(tiny_dir).split(":")[1]
    tensors = load_file(changed / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert weights.fingerprint(str(changed)).split(":")[1] != weights.fingerprint(tiny_dir).split(":")[1]
