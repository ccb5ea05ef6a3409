"""Losses against hand-computed values, loop references and their expected properties."""

import logging
import math

import pytest
import torch
from pydantic import ValidationError

from cmhash.config.choices.losses import InfoNCE
from cmhash.config.schema import parse_params
from cmhash.errors import ConfigError
from cmhash.losses import LOSSES, InfoNCELoss, build_loss, warn_if_small_batch

ALL = LOSSES.names()
CONTRASTIVE = ["balanced", "contrastive", "infonce"]

# Hand cases. Rows are deliberately not unit-length: the contrastive and cosine losses must
# normalise inside. Unit directions: x1 = e1, x2 = e2, y1 = e1, y2 = (0.6, 0.8).
# Cross-modal cosines cos(x_i, y_j): [[1, 0.6], [0, 0.8]].
# Intra-modal cosines: cos(x1, x2) = 0, cos(y1, y2) = 0.6.
X2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
Y2 = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)


def nll(positive: float, others: list[float]) -> float:
    """-log(exp(positive) / (exp(positive) + sum(exp(others))))."""
    return -math.log(math.exp(positive) / (math.exp(positive) + sum(math.exp(o) for o in others)))


def value(name: str, x: torch.Tensor, y: torch.Tensor, **knobs) -> float:
    return build_loss(name, knobs)(x, y).item()


def test_registry_names_and_contrastive_flags():
    assert ALL == ["balanced", "contrastive", "cosine", "cosine_mse", "infonce", "mse"]
    assert sorted(n for n in ALL if LOSSES[n].contrastive) == CONTRASTIVE


# ---------------------------------------------------------------- hand-computed values


def test_contrastive_hand_value():
    # tau = 0.5, so logits are 2 * cosine. Anchors [x1, x2, y1, y2]; denominators skip the anchor:
    #   x1: pos y1 = 2,   others x2 = 0,   y1 = 2,   y2 = 1.2
    #   x2: pos y2 = 1.6, others x1 = 0,   y1 = 0,   y2 = 1.6
    #   y1: pos x1 = 2,   others x1 = 2,   x2 = 0,   y2 = 1.2
    #   y2: pos x2 = 1.6, others x1 = 1.2, x2 = 1.6, y1 = 1.2
    anchors = [nll(2, [0, 1.2]), nll(1.6, [0, 0]), nll(2, [0, 1.2]), nll(1.6, [1.2, 1.2])]
    expected = sum(anchors) / 4
    assert value("contrastive", X2, Y2) == pytest.approx(expected, rel=1e-12)
    assert value("contrastive", X2, Y2, temperature=0.5) == pytest.approx(expected, rel=1e-12)


def test_infonce_hand_value():
    # Default tau = 0.07; logits = cosine / tau over the cross-modal matrix [[1, .6], [0, .8]].
    t = 0.07
    rows = nll(1 / t, [0.6 / t]) + nll(0.8 / t, [0 / t])  # image -> text
    cols = nll(1 / t, [0 / t]) + nll(0.8 / t, [0.6 / t])  # text -> image
    assert value("infonce", X2, Y2) == pytest.approx((rows / 2 + cols / 2) / 2, rel=1e-12)


def test_balanced_hand_value():
    # 3 x 3 so that the weights differ: S1 = 3, S0 = 6, S = 9, w_pos = 3, w_neg = 1.5; tau = 0.5.
    # x = e1, e2, e3 (scaled); y = e1, (0.6, 0.8, 0), (0, 0.6, 0.8) (scaled), so
    # cos(x_i, y_j) = [[1, .6, 0], [0, .8, .6], [0, 0, .8]]; logits = 2 * cosine.
    x = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    y = torch.tensor([[3.0, 0, 0], [3, 4, 0], [0, 6, 8]], dtype=torch.float64)

    def term(pos: float, negs: list[float]) -> float:
        # -w_pos * log(e^pos / (e^pos + w_neg * sum e^neg))
        return -3 * math.log(math.exp(pos) / (math.exp(pos) + 1.5 * sum(math.exp(n) for n in negs)))

    rows = term(2, [1.2, 0]) + term(1.6, [0, 1.2]) + term(1.6, [0, 0])
    cols = term(2, [0, 0]) + term(1.6, [1.2, 0]) + term(1.6, [0, 1.2])
    assert value("balanced", x, y) == pytest.approx((rows / 3 + cols / 3) / 2, rel=1e-12)


def test_mse_cosine_and_cosine_mse_hand_values():
    # differences x - y = (1, 0), (-3, -1): squares 1 + 0 + 9 + 1 = 11 over 4 entries.
    # cos(x1, y1) = 1 and cos(x2, y2) = 0.8, so mean(1 - cos) = (0 + 0.2) / 2 = 0.1.
    assert value("mse", X2, Y2) == pytest.approx(11 / 4, rel=1e-12)
    assert value("cosine", X2, Y2) == pytest.approx(0.1, rel=1e-12)
    assert value("cosine_mse", X2, Y2) == pytest.approx(0.7 * 0.1 + 0.3 * 2.75, rel=1e-12)
    only_cosine = value("cosine_mse", X2, Y2, cosine_weight=2, mse_weight=0)
    assert only_cosine == pytest.approx(0.2, rel=1e-12)


# ---------------------------------------------------------------- loop references


def unit_rows(t: torch.Tensor) -> list[list[float]]:
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in t.tolist()]


def dot(a: list[float], b: list[float]) -> float:
    return sum(u * v for u, v in zip(a, b))


def loop_contrastive(x, y, tau):
    z = unit_rows(x) + unit_rows(y)
    n, b = len(z), len(x)
    total = 0.0
    for k in range(n):
        pos = (k + b) % n
        others = [dot(z[k], z[j]) / tau for j in range(n) if j not in (k, pos)]
        total += nll(dot(z[k], z[pos]) / tau, others)
    return total / n


def loop_cross_modal(x, y, tau, w_pos=1.0, w_neg=1.0):
    xs, ys = unit_rows(x), unit_rows(y)
    b = len(xs)
    total = 0.0
    for i in range(b):
        pos = dot(xs[i], ys[i]) / tau
        row = sum(math.exp(dot(xs[i], ys[j]) / tau) for j in range(b) if j != i)
        col = sum(math.exp(dot(xs[j], ys[i]) / tau) for j in range(b) if j != i)
        for negatives in (row, col):
            total += -w_pos * math.log(math.exp(pos) / (math.exp(pos) + w_neg * negatives))
    return total / (2 * b)


def loop_balanced(x, y, tau):
    b = len(x)
    s1, s0 = b, b * (b - 1)
    return loop_cross_modal(x, y, tau, w_pos=(s1 + s0) / s1, w_neg=(s1 + s0) / s0)


def loop_mse(x, y):
    xs, ys = x.tolist(), y.tolist()
    return sum((u - v) ** 2 for a, b in zip(xs, ys) for u, v in zip(a, b)) / (len(xs) * len(xs[0]))


def loop_cosine(x, y):
    return sum(1 - dot(a, b) for a, b in zip(unit_rows(x), unit_rows(y))) / len(x)


LOOP_REFERENCES = {
    "contrastive": lambda x, y: loop_contrastive(x, y, 0.3),
    "balanced": lambda x, y: loop_balanced(x, y, 0.3),
    "infonce": lambda x, y: loop_cross_modal(x, y, 0.1),
    "mse": loop_mse,
    "cosine": loop_cosine,
    "cosine_mse": lambda x, y: 0.4 * loop_cosine(x, y) + 1.5 * loop_mse(x, y),
}
KNOBS = {
    "contrastive": {"temperature": 0.3},
    "balanced": {"temperature": 0.3},
    "infonce": {"temperature": 0.1},
    "cosine_mse": {"cosine_weight": 0.4, "mse_weight": 1.5},
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("batch", [2, 3, 8, 17])
def test_matches_loop_reference(name, batch):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    expected = LOOP_REFERENCES[name](x, y)
    assert value(name, x, y, **KNOBS.get(name, {})) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_contrastive_losses_are_zero_for_a_single_pair(name):
    # One pair has no negatives: the positive is the whole denominator, so log(1) = 0.
    x, y = torch.randn(1, 4), torch.randn(1, 4)
    assert value(name, x, y) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("name", ALL)
def test_gradients_are_finite(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen)
    y = torch.randn(8, 16, generator=gen)
    for a, b in [(x, y), (x, x.clone()), (torch.tanh(x), torch.tanh(x))]:
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = build_loss(name)(a, b)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_symmetric_in_the_modalities(name):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 7, generator=gen, dtype=torch.float64)
    loss = build_loss(name)
    assert loss(x, y).item() == pytest.approx(loss(y, x).item(), rel=1e-12)
    # Pairing matters: misaligning the rows changes the value.
    assert loss(x, y).item() != pytest.approx(loss(x, y.roll(1, dims=0)).item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_lowest_for_identical_well_separated_pairs(name):
    batch, dim = 8, 16
    gen = torch.Generator().manual_seed(2)
    orthonormal, _ = torch.linalg.qr(torch.randn(dim, batch, generator=gen, dtype=torch.float64))
    x = orthonormal.T  # [8, 16] orthonormal rows
    loss = build_loss(name)
    matched = loss(x, x).item()
    shuffled = loss(x, x[torch.randperm(batch, generator=gen)]).item()
    random = loss(x, torch.randn(batch, dim, generator=gen, dtype=torch.float64)).item()
    assert matched < shuffled and matched < random
    if not LOSSES[name].contrastive:
        assert matched == pytest.approx(0.0, abs=1e-12)


def test_infonce_near_its_lower_bound_on_identical_orthonormal_pairs():
    # Each anchor's logits: 1/tau for the positive and 0 for the B-1 orthogonal negatives,
    # so the loss is log(1 + (B-1) * exp(-1/tau)), about 4e-6 at tau = 0.07, B = 8.
    x = torch.eye(8, dtype=torch.float64)
    expected = math.log(1 + 7 * math.exp(-1 / 0.07))
    loss = value("infonce", x, x)
    assert loss == pytest.approx(expected, rel=1e-9)
    assert 0 < loss < 1e-5


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="one shape"):
        build_loss("infonce")(torch.randn(4, 8), torch.randn(5, 8))


# ---------------------------------------------------------------- build_loss errors and warning


def test_unknown_loss_lists_every_valid_name():
    with pytest.raises(ConfigError) as err:
        build_loss("triplet")
    message = str(err.value)
    assert "'triplet'" in message and "\n" not in message
    assert message.endswith("choose one of: " + ", ".join(ALL))


def knob_error(name: str, knobs: dict) -> str:
    """The one-line error params.yaml gets for `losses.<name>: knobs`."""
    with pytest.raises(ConfigError) as err:
        parse_params({"loss": name, "losses": {name: knobs}})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", CONTRASTIVE)
@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), "warm", None, True])
def test_temperature_must_be_positive_number(name, bad):
    assert f"losses.{name}.temperature = {bad!r}: " in knob_error(name, {"temperature": bad})
    with pytest.raises(ValidationError):  # built directly from a dict, as the benchmarks do
        build_loss(name, {"temperature": bad})


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_temperature_as_pyyaml_reads_5e_1_is_accepted(name):
    # PyYAML reads 5e-1 (no dot) as the string "5e-1"; like every params.yaml number it counts
    assert build_loss(name, {"temperature": "5e-1"}).temperature == 0.5
    assert parse_params({"loss": name, "losses": {name: {"temperature": "5e-1"}}}).loss_knobs.temperature == 0.5


@pytest.mark.parametrize("knob", ["cosine_weight", "mse_weight"])
def test_weights_must_not_be_negative(knob):
    assert f"losses.cosine_mse.{knob} = -0.1: " in knob_error("cosine_mse", {knob: -0.1})


def test_weights_must_not_both_be_zero():
    assert "both 0" in knob_error("cosine_mse", {"cosine_weight": 0, "mse_weight": 0})
    with pytest.raises(ValidationError, match="both 0"):
        build_loss("cosine_mse", {"cosine_weight": 0, "mse_weight": 0})


def test_unknown_knob_names_the_valid_ones():
    assert "unknown key losses.infonce.tau; valid keys here: temperature" in knob_error("infonce", {"tau": 0.1})
    assert "unknown key losses.cosine_mse.temperature; valid keys here: cosine_weight, mse_weight" in knob_error(
        "cosine_mse", {"temperature": 0.1})


def test_knobs_are_applied():
    assert build_loss("contrastive", {"temperature": 0.2}).temperature == 0.2
    assert build_loss("infonce").temperature == 0.07
    weighted = build_loss("cosine_mse", {"mse_weight": 0.5})
    assert (weighted.knobs.cosine_weight, weighted.knobs.mse_weight) == (0.7, 0.5)
    assert isinstance(build_loss("mse", None), LOSSES["mse"])
    # a knobs section is taken as it is; the classes default to their registered knobs
    assert build_loss("infonce", InfoNCE(temperature=0.3)).temperature == 0.3
    assert InfoNCELoss(InfoNCE(temperature=0.1)).temperature == 0.1
    assert InfoNCELoss().temperature == 0.07


def test_params_loss_knobs_reach_the_loss():
    p = parse_params({"loss": "infonce", "losses": {"infonce": {"temperature": 0.25}}})
    assert build_loss(p.loss, p.loss_knobs).temperature == 0.25


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_small_batch_warning_for_contrastive_losses(name, caplog):
    loss = build_loss(name)
    with caplog.at_level(logging.WARNING, logger="cmhash"):
        message = warn_if_small_batch(loss, 15)
    assert message is not None and name in message and "\n" not in message
    assert [r.getMessage() for r in caplog.records if r.name == "cmhash"] == [message]
    assert warn_if_small_batch(loss, 16) is None
    assert warn_if_small_batch(loss, 64, minimum=128) is not None


@pytest.mark.parametrize("name", ["mse", "cosine", "cosine_mse"])
def test_no_small_batch_warning_without_negatives(name, caplog):
    with caplog.at_level(logging.WARNING, logger="cmhash"):
        assert warn_if_small_batch(build_loss(name), 2) is None
    assert not caplog.records
