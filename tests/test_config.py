import math

import pytest

from cmhash.config import COUNT, NON_NEGATIVE, POSITIVE, Range
from cmhash.errors import ConfigError


@pytest.mark.parametrize(("allowed", "value", "holds"), [
    (COUNT, 1, True), (COUNT, 0, False), (COUNT, 2.0, False), (COUNT, "2", False), (COUNT, True, False),
    (POSITIVE, 1e-9, True), (POSITIVE, 0, False), (POSITIVE, "1e-4", True), (POSITIVE, "fast", False),
    (POSITIVE, math.inf, False), (POSITIVE, math.nan, False), (POSITIVE, None, False),
    (NON_NEGATIVE, 0, True), (NON_NEGATIVE, -1e-12, False),
    (Range(False, 0, high=1), 0.999, True), (Range(False, 0, high=1), 1, False),  # high excluded by default
    (Range(False, 0, True, 1, open_high=False), 1, True), (Range(False, 0, True, 1, open_high=False), 0, False),
])
def test_range_holds_exactly_its_values(allowed, value, holds):
    assert allowed.holds(value) is holds


def test_check_returns_the_number_and_names_the_key_in_one_line():
    assert POSITIVE.check("train.fusion.lr", "3e-4") == pytest.approx(3e-4)
    assert COUNT.check("train.batch_size", 128) == 128
    with pytest.raises(ConfigError) as err:
        Range(False, 0, True, 1, open_high=False).check("train.schedule.gamma", 2.0, " (a decay)")
    assert str(err.value) == "train.schedule.gamma must be a number > 0 and <= 1 (a decay), got 2.0"
