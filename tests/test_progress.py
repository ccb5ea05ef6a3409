from cmhash.runtime.progress import rate_text


def test_fast_items_show_items_per_second():
    assert rate_text(1234.4, "pair") == "1,234 pair/s"
    assert rate_text(1.0, "epoch") == "1 epoch/s"


def test_slow_items_show_seconds_per_item():
    assert rate_text(0.25, "epoch") == "4.0 s/epoch"


def test_unknown_speed_shows_nothing():
    assert rate_text(None, "epoch") == ""
    assert rate_text(0.0, "epoch") == ""
