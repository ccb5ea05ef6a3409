"""LR schedules against closed-form formulas written here, independently of torch's schedulers."""

from __future__ import annotations

import math

import pytest
import torch

from cmhash.config.choices.schedules import SCHEDULES
from cmhash.config.schema import Schedule, parse_params
from cmhash.errors import ConfigError
from cmhash.training.schedule import ScheduleStepper, build_scheduler

BASES = (1e-4, 1e-3)  # fusion-like and hash-head-like param groups
WARMUP_LR = 1e-6
ETA_MIN = 1e-6


def optimizer() -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in BASES]
    return torch.optim.SGD(groups)


def section(cfg: dict, epochs: int) -> Schedule:
    """`cfg` as the train.schedule section params.yaml would give, checked against `epochs` and BASES."""
    schedule = Schedule.model_validate(cfg)
    schedule.check_against(epochs, list(BASES))
    return schedule


def lr_curve(cfg: dict, epochs: int) -> list[tuple[float, ...]]:
    """The lr of each group during epochs 0..epochs-1, plus the value left after the last step,
    stepping once per epoch as the training loop does."""
    opt = optimizer()
    scheduler = build_scheduler(opt, section(cfg, epochs), epochs)
    curve = []
    for _ in range(epochs):
        curve.append(tuple(group["lr"] for group in opt.param_groups))
        opt.step()
        scheduler.step()
    curve.append(tuple(group["lr"] for group in opt.param_groups))
    return curve


def warmup(base: float, epoch: int, warmup_epochs: int) -> float:
    return WARMUP_LR + (base - WARMUP_LR) * epoch / warmup_epochs


def cosine(base: float, t: float, period: float) -> float:
    return ETA_MIN + (base - ETA_MIN) * (1 + math.cos(math.pi * t / period)) / 2


def restart_position(t: int, period: int, mult: int) -> tuple[int, int]:
    """(epochs since the last restart, current cycle length) after t epochs of warm restarts."""
    while t >= period:
        t, period = t - period, period * mult
    return t, period


def expected(name: str, cfg: dict, epochs: int, base: float, epoch: int) -> float:
    w = cfg["warmup_epochs"]
    if epoch < w:
        return warmup(base, epoch, w)
    t = epoch - w
    knobs = cfg.get(name, {})
    if name == "cosine":
        return cosine(base, t, epochs - w)
    if name == "cosine_restarts":
        return cosine(base, *restart_position(t, knobs["first_period"], knobs["period_mult"]))
    if name == "step":
        return base * knobs["gamma"] ** (t // knobs["step_size"])
    if name == "multistep":
        return base * knobs["gamma"] ** sum(m <= epoch for m in knobs["milestones"])
    return base  # constant


CASES = {  # name -> (train.schedule section, epochs)
    "cosine": ({"name": "cosine", "warmup_epochs": 2, "warmup_lr": WARMUP_LR, "cosine": {"eta_min": ETA_MIN}}, 12),
    "cosine_restarts": ({"name": "cosine_restarts", "warmup_epochs": 2, "warmup_lr": WARMUP_LR,
                         "cosine_restarts": {"eta_min": ETA_MIN, "first_period": 3, "period_mult": 2}}, 16),
    "step": ({"name": "step", "warmup_epochs": 3, "warmup_lr": WARMUP_LR, "step": {"step_size": 4, "gamma": 0.5}}, 15),
    "multistep": ({"name": "multistep", "warmup_epochs": 2, "warmup_lr": WARMUP_LR,
                   "multistep": {"milestones": [5, 8], "gamma": 0.1}}, 10),
    "constant": ({"name": "constant", "warmup_epochs": 4, "warmup_lr": WARMUP_LR, "constant": {}}, 7),
}


def test_every_schedule_has_a_case() -> None:
    assert set(CASES) == set(SCHEDULES.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_whole_curve_matches_formula(name: str) -> None:
    cfg, epochs = CASES[name]
    curve = lr_curve(cfg, epochs)
    for epoch, lrs in enumerate(curve[:epochs]):
        assert lrs == pytest.approx([expected(name, cfg, epochs, base, epoch) for base in BASES], rel=1e-9), epoch


@pytest.mark.parametrize("name", sorted(CASES))
def test_warmup_starts_at_warmup_lr_in_every_group_and_reaches_each_base(name: str) -> None:
    cfg, epochs = CASES[name]
    curve = lr_curve(cfg, epochs)
    w = cfg["warmup_epochs"]
    assert curve[0] == pytest.approx((WARMUP_LR, WARMUP_LR), rel=1e-12)
    # halfway through warm-up each group is at the midpoint of its own range
    assert curve[w // 2] == pytest.approx([WARMUP_LR + (b - WARMUP_LR) * (w // 2) / w for b in BASES], rel=1e-12)
    assert curve[w] == pytest.approx(BASES, rel=1e-9)


def test_cosine_midpoint_and_end() -> None:
    cfg, epochs = CASES["cosine"]  # 2 warm-up epochs, then 10 of cosine
    curve = lr_curve(cfg, epochs)
    assert curve[2 + 5] == pytest.approx([(b + ETA_MIN) / 2 for b in BASES], rel=1e-9)
    assert curve[epochs] == pytest.approx((ETA_MIN, ETA_MIN), rel=1e-9)
    assert all(a > b for a, b in zip(curve[2:], curve[3:]))  # strictly decreasing after warm-up


def test_cosine_without_warmup_starts_at_base() -> None:
    cfg = {"name": "cosine", "warmup_epochs": 0, "cosine": {"eta_min": 0.0}}
    curve = lr_curve(cfg, 4)
    assert curve[0] == pytest.approx(BASES)
    assert curve[2] == pytest.approx([b / 2 for b in BASES], rel=1e-9)
    assert curve[4] == pytest.approx((0.0, 0.0), abs=1e-15)


def test_cosine_restarts_jump_back_to_base_at_each_restart() -> None:
    cfg, epochs = CASES["cosine_restarts"]  # warm-up 2, cycles of 3 then 6 then 12 epochs
    curve = lr_curve(cfg, epochs)
    for restart in (2, 2 + 3, 2 + 3 + 6):
        assert curve[restart] == pytest.approx(BASES, rel=1e-9)
        assert curve[restart - 1][1] < BASES[1]  # the epoch before a restart is annealed
    # a third of the way into the 3-epoch cycle: cos(pi/3) = 1/2
    assert curve[3] == pytest.approx([ETA_MIN + (b - ETA_MIN) * 0.75 for b in BASES], rel=1e-9)


def test_step_drops_every_step_size_after_warmup() -> None:
    cfg, epochs = CASES["step"]  # warm-up 3, x0.5 every 4 epochs from there
    curve = lr_curve(cfg, epochs)
    assert curve[6] == pytest.approx(BASES)
    assert curve[7] == pytest.approx([b / 2 for b in BASES])
    assert curve[11] == pytest.approx([b / 4 for b in BASES])


def test_multistep_milestones_are_absolute_epochs() -> None:
    cfg, epochs = CASES["multistep"]  # milestones [5, 8] counted from the start of training
    curve = lr_curve(cfg, epochs)
    assert curve[4] == pytest.approx(BASES)
    assert curve[5] == pytest.approx([b * 0.1 for b in BASES])
    assert curve[8] == pytest.approx([b * 0.01 for b in BASES])


def test_resumed_schedule_continues_the_same_curve() -> None:
    cfg, epochs = CASES["cosine_restarts"]
    full = lr_curve(cfg, epochs)
    first_opt = optimizer()
    first = build_scheduler(first_opt, section(cfg, epochs), epochs)
    for _ in range(4):  # stop inside the first cycle, after warm-up
        first_opt.step()
        first.step()
    resumed_opt = optimizer()
    resumed = build_scheduler(resumed_opt, section(cfg, epochs), epochs)
    resumed_opt.load_state_dict(first_opt.state_dict())
    resumed.load_state_dict(first.state_dict())
    for epoch in range(4, epochs):
        assert tuple(g["lr"] for g in resumed_opt.param_groups) == pytest.approx(full[epoch], rel=1e-9)
        resumed_opt.step()
        resumed.step()


def test_only_the_chosen_schedules_knobs_are_read() -> None:
    # the other schedules' sections (all of them are in params.yaml) change nothing
    cfg, epochs = CASES["cosine"]
    others = {"step": {"step_size": 1, "gamma": 0.01}, "multistep": {"milestones": [3], "gamma": 0.5},
              "cosine_restarts": {"eta_min": 0.0, "first_period": 1, "period_mult": 3}}
    assert lr_curve({**cfg, **others}, epochs) == lr_curve(cfg, epochs)


def test_missing_knobs_take_their_defaults() -> None:
    schedule = Schedule(name="cosine", warmup_epochs=2)
    assert schedule.knobs.eta_min == 1e-6 and schedule.warmup_lr == 1e-6
    assert lr_curve({"name": "cosine", "warmup_epochs": 2}, 12) == lr_curve(CASES["cosine"][0], 12)


def test_yaml_style_string_numbers_are_accepted() -> None:
    # PyYAML reads `1e-6` (no dot) as a string
    cfg = {"name": "cosine", "warmup_epochs": 2, "warmup_lr": "1e-6", "cosine": {"eta_min": "1e-6"}}
    assert lr_curve(cfg, 12) == lr_curve(CASES["cosine"][0], 12)


def schedule_error(schedule, epochs: int) -> str:
    """The one-line error for params.yaml's train.schedule = `schedule`, with both tasks training `epochs`
    epochs at the lrs of BASES (task 0: the fusion lr; task 1: fusion_lr and the heads' lr)."""
    train = {"schedule": schedule, "fusion": {"epochs": epochs, "lr": BASES[0]},
             "hash": {"epochs": epochs, "lr": BASES[1], "fusion_lr": BASES[0]}}
    with pytest.raises(ConfigError) as err:
        parse_params({"train": train})
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_name_lists_valid_ones() -> None:
    message = schedule_error({"name": "cosin", "warmup_epochs": 0}, 5)
    assert "train.schedule.name = 'cosin'" in message
    assert message.endswith("unknown schedule 'cosin'; choose one of: " + ", ".join(SCHEDULES.names()))


def test_schedule_must_fit_the_epochs_of_each_task() -> None:
    cfg = {**CASES["cosine"][0], "warmup_epochs": 5}
    parse_params({"train": {"schedule": cfg, "fusion": {"epochs": 6}, "hash": {"epochs": 6}}})
    with pytest.raises(ConfigError, match=r"schedule does not fit train\.hash: warmup_epochs \(5\)"):
        parse_params({"train": {"schedule": cfg, "fusion": {"epochs": 6}, "hash": {"epochs": 5}}})
    with pytest.raises(ValueError, match="warmup_epochs"):  # the check itself, as build-time code may call it
        Schedule.model_validate(cfg).check_against(5, [1e-3])


COSINE = CASES["cosine"][0]
STEP = CASES["step"][0]
RESTARTS = CASES["cosine_restarts"][0]
MULTISTEP = CASES["multistep"][0]


@pytest.mark.parametrize(("cfg", "epochs", "fragment"), [
    (COSINE, 0, "train.fusion.epochs = 0"),
    (COSINE, -3, "train.fusion.epochs = -3"),
    ({**COSINE, "warmup_epochs": -1}, 10, "train.schedule.warmup_epochs = -1"),
    ({**COSINE, "warmup_epochs": 10}, 10, "warmup_epochs (10) must be smaller than the training epochs (10)"),
    ({**COSINE, "warmup_epochs": 1.5}, 10, "train.schedule.warmup_epochs = 1.5"),
    ({**COSINE, "warmup_lr": -1e-6}, 10, "train.schedule.warmup_lr = -1e-06"),
    # above the first group's lr
    ({**COSINE, "warmup_lr": 5e-4}, 10, "warmup_lr (0.0005) must be at most the smallest param-group lr (0.0001)"),
    ({**COSINE, "cosine": {"eta_min": -1e-6}}, 10, "train.schedule.cosine.eta_min = -1e-06"),
    ({**COSINE, "cosine": {"eta_min": 2e-4}}, 10, "cosine.eta_min (0.0002) must be at most"),  # above the first group's lr
    ({**COSINE, "cosine": {"eta_min": "small"}}, 10, "train.schedule.cosine.eta_min = 'small'"),
    ({**COSINE, "cosine": {"eta_min": None}}, 10, "train.schedule.cosine.eta_min = None"),
    ({**COSINE, "warmup_epoch": 1}, 10, "unknown key train.schedule.warmup_epoch; did you mean train.schedule.warmup_epochs?"),
    ({**COSINE, "eta_min": 1e-6}, 10, "unknown key train.schedule.eta_min; it is now train.schedule.<name>.eta_min"),  # old layout
    ({**STEP, "step": {"gamma": 0}}, 20, "train.schedule.step.gamma = 0"),
    ({**STEP, "step": {"gamma": -0.5}}, 20, "train.schedule.step.gamma = -0.5"),
    ({**STEP, "step": {"gamma": 2.0}}, 20, "train.schedule.step.gamma = 2.0"),
    ({**STEP, "step": {"step_size": 0}}, 20, "train.schedule.step.step_size = 0"),
    ({**RESTARTS, "cosine_restarts": {"first_period": 0}}, 20, "train.schedule.cosine_restarts.first_period = 0"),
    ({**RESTARTS, "cosine_restarts": {"period_mult": 0}}, 20, "train.schedule.cosine_restarts.period_mult = 0"),
    ({**RESTARTS, "restart_period": 3}, 20, "it is now train.schedule.cosine_restarts.first_period"),  # old layout
    ({**MULTISTEP, "multistep": {"milestones": []}}, 10, "train.schedule.multistep.milestones = []"),
    ({**MULTISTEP, "multistep": {"milestones": [8, 5]}}, 10, "train.schedule.multistep.milestones = [8, 5]"),
    ({**MULTISTEP, "multistep": {"milestones": [2, 5]}}, 10, "milestones [2, 5] must lie after the warm-up (2)"),  # inside the warm-up
    ({**MULTISTEP, "multistep": {"milestones": [5, 10]}}, 10, "before the last epoch (10)"),  # never reached
    ("cosine", 10, "train.schedule = 'cosine': input should be a valid dictionary"),
])
def test_bad_values_raise_one_line_config_error(cfg, epochs: int, fragment: str) -> None:
    assert fragment in schedule_error(cfg, epochs)


# ---- when the schedule steps, and on which groups ----------------------------------------------

def named_optimizer() -> torch.optim.Optimizer:
    groups = [{"name": name, "params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for name, lr in zip(("fusion", "hash"), BASES)]
    return torch.optim.SGD(groups)


def lrs(opt: torch.optim.Optimizer) -> tuple[float, ...]:
    return tuple(group["lr"] for group in opt.param_groups)


def test_per_batch_multistep_on_the_heads_alone_is_the_public_codes_schedule() -> None:
    """milestones [3, 5] batches, gamma 1.2, 4 batches an epoch: the heads' lr is 1e-3 for batches
    0-2, 1.2e-3 for 3-4, 1.44e-3 from 5 on; the fusion lr never moves; epochs do not step it."""
    cfg = Schedule.model_validate({"name": "multistep", "every": "batch", "groups": "hash",
                                   "multistep": {"milestones": [3, 5], "gamma": 1.2}})
    opt = named_optimizer()
    schedule = ScheduleStepper(opt, cfg, 3, 4)
    seen = []
    for _ in range(3):
        for _ in range(4):
            seen.append(lrs(opt))
            opt.step()
            schedule.after_batch()
        schedule.after_epoch()  # no step per epoch
    heads = [1e-3] * 3 + [1.2e-3] * 2 + [1.44e-3] * 7
    assert [lr for _, lr in seen] == pytest.approx(heads, rel=1e-12)
    assert all(fusion == BASES[0] for fusion, _ in seen)


def test_the_default_steps_every_group_once_per_epoch_and_never_per_batch() -> None:
    cfg = {"name": "step", "step": {"step_size": 1, "gamma": 0.5}}
    opt = named_optimizer()
    schedule = ScheduleStepper(opt, section(cfg, 4), 4, 10)
    for epoch in range(4):
        assert lrs(opt) == pytest.approx(tuple(base * 0.5 ** epoch for base in BASES), rel=1e-12)
        for _ in range(10):
            opt.step()
            schedule.after_batch()  # no step per batch
        schedule.after_epoch()
    assert lrs(opt) == pytest.approx(tuple(base * 0.5 ** 4 for base in BASES), rel=1e-12)


def test_heads_only_holds_the_fusion_lr_through_warm_up_and_decay() -> None:
    cfg = section({"name": "cosine", "warmup_epochs": 2, "warmup_lr": WARMUP_LR, "groups": "hash", "cosine": {"eta_min": ETA_MIN}}, 6)
    opt = named_optimizer()
    schedule = ScheduleStepper(opt, cfg, 6, 1)
    for epoch in range(6):
        fusion, heads = lrs(opt)
        assert fusion == BASES[0]
        expected = warmup(BASES[1], epoch, 2) if epoch < 2 else cosine(BASES[1], epoch - 2, 4)
        assert heads == pytest.approx(expected, rel=1e-9)
        opt.step()
        schedule.after_epoch()


def test_per_batch_counts_warm_up_in_epochs_and_refuses_milestones_inside_it() -> None:
    cfg = Schedule.model_validate({"name": "multistep", "every": "batch", "warmup_epochs": 1, "multistep": {"milestones": [4, 6]}})
    cfg.check_against(2, list(BASES))  # batch milestones are not held to the epochs
    with pytest.raises(ConfigError, match=r"train.schedule.multistep.milestones \[4, 6\] must lie after the warm-up \(5 batches\)"):
        ScheduleStepper(named_optimizer(), cfg, 2, 5)
    opt = named_optimizer()
    ScheduleStepper(opt, cfg, 2, 3)  # warm-up of 3 batches, then milestones at batches 4 and 6
    assert lrs(opt) == pytest.approx((WARMUP_LR, WARMUP_LR))


@pytest.mark.parametrize(("cfg", "fragment"), [
    ({"every": "step"}, "train.schedule.every = 'step'"),
    ({"groups": "heads"}, "train.schedule.groups = 'heads'"),
    ({"multistep": {"gamma": 0}}, "train.schedule.multistep.gamma = 0"),
])
def test_bad_stepping_knobs_are_refused_in_one_line(cfg, fragment) -> None:
    assert fragment in schedule_error({"name": "multistep", **cfg}, 30)
    assert Schedule.model_validate({"multistep": {"gamma": 1.2}}).multistep.gamma == 1.2  # a rise is allowed
