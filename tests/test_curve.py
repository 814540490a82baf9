"""Faithfulness against circuit size: resample-ablation against its hook reference, the curve's
endpoints and its agreement with `criteria.faithfulness`, and the summaries' arithmetic."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_pair

from ioi.circuits import criteria as C
from ioi.circuits import curve


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=10, templates="full")


def _all_heads(model):
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def test_resampling_matches_its_hooked_reference(tiny_model, data):
    """Each prompt takes its own ABC counterpart's head outputs: the fast engine equals the hooked
    run with the corrupted cache written in, for circuits at every kind of position."""
    clean, corrupted = data
    circuits = [
        C.Circuit({"a": ((0, 1), (2, 0)), "b": ((1, 2),), "c": ((2, 3),)}, {"a": "END", "b": "S2", "c": "ALL"}),
        C.Circuit({"a": ((1, 0), (1, 3)), "b": ((0, 2), (2, 1))}, {"a": "ALL", "b": "S1+1"}),
        C.Circuit({}, {}),
    ]
    got = C.circuit_logit_diffs(tiny_model, circuits, clean, C.resampling(tiny_model, clean, corrupted))
    reference = C.resampled_values(tiny_model, corrupted)
    for circuit, values in zip(circuits, got):
        expected = C.run_circuit(tiny_model, circuit, clean, reference)
        torch.testing.assert_close(values, expected, atol=1e-4, rtol=0)


def test_resampling_from_the_clean_prompts_changes_nothing(tiny_model, data):
    """Resampling each prompt from itself puts every head's own output back: any circuit then
    gives the clean run's logit difference."""
    clean, _ = data
    ablation = C.resampling(tiny_model, clean, clean)
    circuits = [C.Circuit({}, {}), C.Circuit({"a": ((1, 2),)}, {"a": "S2"})]
    got = C.circuit_logit_diffs(tiny_model, circuits, clean, ablation)
    whole = C.circuit_logit_diffs(tiny_model, [C.whole_model(tiny_model)], clean, ablation)[0]
    torch.testing.assert_close(got, whole.expand_as(got), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def frame(tiny_model, data):
    clean, corrupted = data
    heads = _all_heads(tiny_model)
    rankings = {("forward", None): heads, ("backward", None): heads[::-1]}
    rankings.update({("random", s): order for s, order in curve.random_rankings(tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, 2).items()})
    ablations = {"mean": C.mean_ablation(tiny_model, clean, corrupted), "resample": C.resampling(tiny_model, clean, corrupted)}
    point = C.Circuit({"x": ((0, 1), (2, 0))}, {"x": "END"})
    grid = curve.k_grid(len(heads), 5)
    return curve.faithfulness_curve(tiny_model, clean, corrupted, rankings, ablations, grid, {"point": point})


def test_every_head_kept_gives_one(tiny_model, frame):
    """k = all heads ablates nothing: faithfulness 1 under both ablations, every ranking."""
    n = len(_all_heads(tiny_model))
    at_all = frame[frame.k == n]
    assert set(at_all.ablation) == {"mean", "resample"} and len(at_all) == 2 * 4
    np.testing.assert_allclose(at_all.faithfulness, 1.0, atol=1e-5)


def test_curve_points_equal_faithfulness_of_their_circuit(tiny_model, data, frame):
    """The curve's value at k is `criteria.faithfulness` of the top-k heads kept at every
    position (interval included), and a point circuit is scored at its own positions."""
    clean, corrupted = data
    heads = _all_heads(tiny_model)[::-1]
    ablations = {"mean": C.mean_ablation(tiny_model, clean, corrupted), "resample": C.resampling(tiny_model, clean, corrupted)}
    for name, ablation in ablations.items():
        for k in sorted(frame.k[frame.method == "backward"].unique()):
            row = frame[(frame.method == "backward") & (frame.ablation == name) & (frame.k == k)].iloc[0]
            expected = C.faithfulness(tiny_model, C.Circuit({"c": tuple(heads[:k])}, {"c": "ALL"}), clean, corrupted, ablation=ablation)
            assert row.faithfulness == pytest.approx(expected["faithfulness"], abs=1e-5)  # float32, stacked vs single runs
            # the same bootstrap draws; float32 rounding of stacked vs single runs moves a ratio's
            # percentile by ~1e-6 of its size
            assert (row.ci_low, row.ci_high) == pytest.approx((expected["faithfulness_ci_low"], expected["faithfulness_ci_high"]), abs=1e-4, rel=1e-5)
        point = frame[(frame.method == "point") & (frame.ablation == name)].iloc[0]
        expected = C.faithfulness(tiny_model, C.Circuit({"x": ((0, 1), (2, 0))}, {"x": "END"}), clean, corrupted, ablation=ablation)
        assert point.k == 2 and point.faithfulness == pytest.approx(expected["faithfulness"], abs=1e-6)


def test_random_seeds_are_recorded(frame):
    assert sorted(frame[frame.method == "random"].seed.unique()) == [0, 1]
    assert frame[frame.method != "random"].seed.isna().all()


def test_grid_is_log_spaced_with_both_ends():
    grid = curve.k_grid(270, 12)
    assert grid[0] == 1 and grid[-1] == 270 and grid == sorted(set(grid))
    ratios = np.diff(np.log(grid))
    assert ratios.max() < 3 * ratios.min() + 1e-9  # spaced evenly in log k, up to rounding


def test_summary_reads_smallest_k_and_normalised_area():
    """A curve at 1 everywhere has area 1; a step from 0 to 1 at k=10 of 100 heads reaches 0.8 at
    10 and has the trapezoid area over log k / log 100; random's summary averages its seeds."""
    ks = [1, 10, 100]
    rows = [{"method": "flat", "ablation": "mean", "k": k, "seed": None, "faithfulness": 1.0} for k in ks]
    rows += [{"method": "step", "ablation": "mean", "k": k, "seed": None, "faithfulness": float(k >= 10)} for k in ks]
    rows += [{"method": "random", "ablation": "mean", "k": k, "seed": s, "faithfulness": v}
             for s, values in enumerate([(0.0, 0.6, 1.0), (0.0, 1.0, 1.0)]) for k, v in zip(ks, values)]
    rows += [{"method": "point", "ablation": "mean", "k": 26, "seed": None, "faithfulness": 0.9}]
    summary = curve.summarise(pd.DataFrame(rows), n_heads=100).set_index("method")
    assert "point" not in summary.index
    assert summary.loc["flat", "area"] == pytest.approx(1.0) and summary.loc["flat", "smallest_k"] == 1
    assert summary.loc["step", "smallest_k"] == 10 and summary.loc["step", "area"] == pytest.approx(0.25 + 0.5)
    assert summary.loc["random", "smallest_k"] == 10 and summary.loc["random", "seeds"] == 2
    assert summary.loc["random", "area"] == pytest.approx(0.5 * 0.8 * 0.5 + 0.5 * 0.9)


def test_curve_chart_draws_curves_bands_and_points(frame):
    """The figure takes the curve's frame as it is: a valid chart with one panel per ablation."""
    from ioi.report.figures import faithfulness_curve_chart

    spec = faithfulness_curve_chart(frame).to_dict()
    assert spec["facet"]["column"]["field"] == "ablation"
    kinds = set(pd.DataFrame(spec["datasets"][next(iter(spec["datasets"]))]).kind) if "datasets" in spec else set()
    assert kinds == {"curve", "point"}
