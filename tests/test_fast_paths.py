"""ioi.engines.fast_paths reproduces the hook-based path patching sweep of ioi.engines.hooks_paths."""

import pandas as pd
import pytest
from conftest import make_pair

from ioi.engines import fast_paths
from ioi.engines import hooks_paths as pp

TOL = 1e-4


@pytest.fixture(scope="module")
def data(tiny_model):
    return make_pair(tiny_model, n=10)


def _assert_same(got: pd.DataFrame, expected: pd.DataFrame):
    assert list(got.columns) == list(expected.columns)
    assert got[["layer", "head"]].values.tolist() == expected[["layer", "head"]].values.tolist()
    pd.testing.assert_frame_equal(got, expected, check_exact=False, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "receivers, receiver_input, receiver_position",
    [
        ("logits", "q", None),
        ([(2, 0), (2, 3)], "q", "END"),
        ([(2, 1)], "v", "S2"),
        ([(2, 1)], "k", "S2"),
        ([(1, 2), (2, 0)], "q", "S2"),
        ([(2, 2)], "v", None),
    ],
)
def test_sweep_equals_reference(tiny_model, data, receivers, receiver_input, receiver_position):
    clean, corrupted = data
    args = (tiny_model, clean, corrupted, receivers, receiver_input, receiver_position)
    _assert_same(fast_paths.path_patching(*args), pp.path_patching(*args))


def test_small_batches_change_nothing(tiny_model, data):
    clean, corrupted = data
    args = (tiny_model, clean, corrupted, [(2, 1)], "v", "S2")
    _assert_same(fast_paths.path_patching(*args, batch_size=3), pp.path_patching(*args))


def test_no_receivers_is_an_empty_frame(tiny_model, data):
    clean, corrupted = data
    got = fast_paths.path_patching(tiny_model, clean, corrupted, [], "q", "END")
    expected = pp.path_patching(tiny_model, clean, corrupted, [], "q", "END")
    assert got.empty and expected.empty
    assert list(got.columns) == list(expected.columns) == fast_paths.COLUMNS
