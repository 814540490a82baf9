"""The command line: the `baseline --json` contract other parts of the project rely on,
and clear errors for bad input."""

import json

import pytest

from ioi.cli import main


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IOI_CACHE_DIR", str(tmp_path))


def test_baseline_json_contract(capsys):
    """`baseline --json` prints one JSON object with the agreed keys and types."""
    assert main(["baseline", "--model", "gpt2-small-random", "--n", "6", "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "n", "logit_diff_mean", "logit_diff_ci95", "io_prob_mean", "io_beats_s_frac", "bos"} <= set(out)
    assert out["model"] == "gpt2-small-random" and out["n"] == 6 and out["bos"] is False
    low, high = out["logit_diff_ci95"]
    assert low <= out["logit_diff_mean"] <= high
    assert 0 <= out["io_prob_mean"] <= 1 and 0 <= out["io_beats_s_frac"] <= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["baseline", "--model", "nonexistent-model"], "Unknown model"),
        (["baseline", "--model", "gpt2-small-random", "--n", "0"], "must be positive"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
