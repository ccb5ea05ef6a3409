"""The training engine: early stopping and best-checkpoint selection on scripted val curves,
determinism, resuming an interrupted run exactly, refusing to resume into other settings,
task 1 starting from the fusion checkpoint, bad `train` settings refused before training, the
optimiser and its param groups, and the logged lr and validation curves. CPU, fp32, tiny
synthetic features."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cmhash.config.schema import TrainConfig, parse_params
from cmhash.errors import ConfigError
from cmhash.features.store import FeatureSplit
from cmhash.io import save_pickle
from cmhash.losses import build_loss
from cmhash.models import CrossModalHasher, ModelConfig, save_checkpoint
from cmhash.runtime.precision import Precision
from cmhash.training import task as task_module
from cmhash.training.engine import TrainState, fit
from cmhash.training.hooks import Checkpointer, EarlyStopping
from cmhash.training.resume import RunFolder
from cmhash.training.runner import Runner
from cmhash.training.schedule import ScheduleStepper
from cmhash.training.task import TaskSettings, open_live, train_task
from conftest import SYNTHETIC_CLASSES, SYNTHETIC_DIM, synthetic

D, CLASSES = SYNTHETIC_DIM, SYNTHETIC_CLASSES


def model_config(params: dict, bits: int | None = None) -> ModelConfig:
    """The model the test params describe, on D-dim features (as train_task builds it)."""
    p = parse_params(params)
    return ModelConfig(arch=p.model.arch, knobs=p.model.knobs.model_dump(), feature_dim=D, bits=bits,
                       hash_head=p.hash_head if bits else None, loss=p.loss)


@pytest.fixture
def fusion_ckpt(tmp_path: Path, params: dict) -> Path:
    """A task-0 checkpoint with the test params' model config (random weights)."""
    torch.manual_seed(7)
    model = CrossModalHasher(model_config(params))
    save_checkpoint(tmp_path / "fusion.pt", model, epoch=1, val_map=0.5)
    return tmp_path / "fusion.pt"


def train(params: dict, root: Path, features_dir: Path, *, bits: int | None = None, init_from: Path | None = None,
          checkpoint_dir: Path | None = None) -> float:
    """Task 0 (bits None) or task 1 with `params` read as the stage reads params.yaml."""
    settings = TaskSettings.of(parse_params(params), "hash" if bits else "fusion")
    with open_live(root / "metrics") as live:
        return train_task(settings, features_dir=features_dir, out_path=root / "out" / "model.pt", live=live,
                          checkpoint_dir=checkpoint_dir or root / "checkpoints", bits=bits, init_from=init_from)


def outputs(root: Path) -> tuple[dict, dict[str, str]]:
    """The stage's output checkpoint and every file dvclive wrote."""
    ckpt = torch.load(root / "out" / "model.pt", weights_only=True)
    curves = {p.relative_to(root / "metrics").as_posix(): p.read_text() for p in sorted((root / "metrics").rglob("*")) if p.is_file()}
    return ckpt, curves


def assert_same_outputs(a: Path, b: Path) -> None:
    (ckpt_a, curves_a), (ckpt_b, curves_b) = outputs(a), outputs(b)
    assert ckpt_a.keys() == ckpt_b.keys() and ckpt_a["config"] == ckpt_b["config"]
    assert (ckpt_a["epoch"], ckpt_a["val_map"]) == (ckpt_b["epoch"], ckpt_b["val_map"])
    assert ckpt_a["state_dict"].keys() == ckpt_b["state_dict"].keys()
    for name, tensor in ckpt_a["state_dict"].items():
        assert torch.equal(tensor, ckpt_b["state_dict"][name]), name
    assert curves_a == curves_b


class Killed(Exception):
    """Stands in for Ctrl-C / a killed `dvc repro`."""


def kill_before_saving_epoch(monkeypatch, epoch: int) -> None:
    """Interrupt after epoch `epoch` was trained, validated and logged, but before last.pt was
    written for it: the resumed run must re-train that epoch exactly (random states restored)."""
    save = RunFolder.__call__

    def call(self, state):
        if state.epoch == epoch:
            raise Killed
        save(self, state)

    monkeypatch.setattr(RunFolder, "__call__", call)


class ScriptedValidator:
    """Writes a fixed val MAP curve instead of measuring one."""

    def __init__(self, curve: list[float]) -> None:
        self.curve = curve

    def __call__(self, state: TrainState) -> None:
        state.logs["val/map"] = self.curve[state.epoch - 1]


# ---- the loop and its hooks on scripted val curves ------------------------------------------


def tiny_state(params: dict) -> tuple[TrainState, FeatureSplit]:
    torch.manual_seed(0)
    model = CrossModalHasher(model_config(params))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = TrainState(Runner(model, build_loss("cosine"), "strict"), optimizer,
                       ScheduleStepper(optimizer, parse_params(params).train.schedule, 20, 1), Precision("fp32", torch.device("cpu")))
    data = synthetic(32, seed=1)
    return state, FeatureSplit(*(torch.from_numpy(data[k]).float() for k in ("image", "text", "label")), meta={})


@pytest.mark.parametrize(("curve", "patience", "min_delta", "stopped_at"), [
    ([0.1, 0.3, 0.2, 0.3, 0.9, 0.9], 2, 0.0, 4),        # no gain at 3 and 4 (equal is no gain)
    ([0.1, 0.3, 0.2, 0.35, 0.3, 0.2, 0.9], 2, 0.0, 6),  # the gain at 4 resets the count
    ([0.1, 0.3, 0.35, 0.3, 0.5, 0.9], 2, 0.1, 4),       # +0.05 at 3 is below min_delta: not a gain
    ([0.5, 0.4, 0.3, 0.2], 0, 0.0, 4),                  # patience 0: never stops early
])
def test_early_stopping_stops_at_the_right_epoch(params, curve, patience, min_delta, stopped_at):
    state, data = tiny_state(params)
    hooks = [ScriptedValidator(curve), EarlyStopping(patience, min_delta)]
    fit(state, data, epochs=len(curve), batch_size=16, clip_grad_norm=0.0, hooks=hooks, generator=torch.Generator().manual_seed(0))
    assert state.epoch == stopped_at


def test_best_checkpoint_is_the_epoch_with_the_best_val_map(params, tmp_path):
    state, data = tiny_state(params)
    weights: dict[int, dict] = {}
    snapshot = lambda s: weights.__setitem__(s.epoch, copy.deepcopy(s.runner.model.state_dict()))  # noqa: E731
    hooks = [ScriptedValidator([0.2, 0.6, 0.4, 0.6, 0.5]), Checkpointer(tmp_path / "best.pt"), snapshot]
    fit(state, data, epochs=5, batch_size=16, clip_grad_norm=0.0, hooks=hooks, generator=torch.Generator().manual_seed(0))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (best["epoch"], best["val_map"], state.best_epoch) == (2, 0.6, 2)  # a tie later does not replace it
    for name, tensor in best["state_dict"].items():
        assert torch.equal(tensor, weights[2][name])
    assert not all(torch.equal(t, weights[5][n]) for n, t in best["state_dict"].items())


# ---- whole training tasks ------------------------------------------------------------------


def test_same_seed_gives_identical_weights_and_curves(params, tmp_path, features_dir):
    params["train"]["fusion"]["epochs"] = 3
    train(params, tmp_path / "a", features_dir)
    train(params, tmp_path / "b", features_dir)
    assert_same_outputs(tmp_path / "a", tmp_path / "b")
    params["seed"] = 1
    train(params, tmp_path / "c", features_dir)
    assert not torch.equal(*(outputs(tmp_path / r)[0]["state_dict"]["fusion.encoder.layers.0.linear1.weight"] for r in "ac"))


@pytest.mark.parametrize(("arch", "bits"), [("reference", None), pytest.param("cross_attention", 16, marks=pytest.mark.slow)])
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(params, tmp_path, features_dir, monkeypatch, arch, bits):
    params["model"]["arch"] = arch
    params["train"]["hash" if bits else "fusion"]["epochs"] = 4
    params["train"]["schedule"].update(name="cosine", warmup_epochs=1)  # the schedule's state matters too
    init = None
    if bits:
        torch.manual_seed(7)
        upstream = CrossModalHasher(model_config(params))
        save_checkpoint(init := tmp_path / "fusion.pt", upstream)
    train(params, tmp_path / "whole", features_dir, bits=bits, init_from=init)

    with monkeypatch.context() as patch:
        kill_before_saving_epoch(patch, 3)
        with pytest.raises(Killed):
            train(params, tmp_path / "resumed", features_dir, bits=bits, init_from=init)
    last = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and (tmp_path / "resumed" / "checkpoints" / "best.pt").is_file()
    train(params, tmp_path / "resumed", features_dir, bits=bits, init_from=init)

    assert_same_outputs(tmp_path / "whole", tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # a finished run leaves nothing to resume


def test_a_resumed_run_keeps_its_early_stopping_count_and_best(params, tmp_path, features_dir, monkeypatch):
    params["train"].update(patience=2)
    params["train"]["fusion"]["epochs"] = 6
    monkeypatch.setattr(task_module, "Validator", lambda *a, **k: ScriptedValidator([0.1, 0.3, 0.2, 0.25, 0.2, 0.9]))
    train(params, tmp_path / "whole", features_dir)
    with monkeypatch.context() as patch:
        kill_before_saving_epoch(patch, 4)
        with pytest.raises(Killed):
            train(params, tmp_path / "resumed", features_dir)
    train(params, tmp_path / "resumed", features_dir)
    assert_same_outputs(tmp_path / "whole", tmp_path / "resumed")
    summary = json.loads((tmp_path / "resumed" / "metrics" / "metrics.json").read_text())
    assert (summary["step"], summary["best_epoch"], summary["best_val_map"]) == (3, 2, 0.3)  # stopped after epoch 4


def interrupted(params: dict, root: Path, features_dir: Path, monkeypatch, **kw) -> None:
    with monkeypatch.context() as patch:
        kill_before_saving_epoch(patch, 2)
        with pytest.raises(Killed):
            train(params, root, features_dir, **kw)


@pytest.mark.parametrize(("change", "named"), [
    (lambda p: p.update(loss="infonce"), "loss"),
    (lambda p: p["model"].update(arch="cross_attention"), "model.arch"),
    (lambda p: p["train"]["fusion"].update(lr=2 * p["train"]["fusion"]["lr"]), "train.fusion.lr"),
    (lambda p: p["train"]["augment"].update(noise_std=0.1), "train.augment.noise_std"),
    (lambda p: p["train"]["schedule"].update(every="batch"), "train.schedule.every"),
])
def test_resuming_with_other_settings_is_refused_in_one_line(params, tmp_path, features_dir, monkeypatch, change, named):
    interrupted(params, tmp_path, features_dir, monkeypatch)
    change(params)
    with pytest.raises(ConfigError, match=rf"checkpoints/last.pt is an unfinished run with other settings \(.*{named}.*differ\)") as err:
        train(params, tmp_path, features_dir)
    assert "\n" not in str(err.value) and "train.resume: false" in str(err.value)
    params["train"]["resume"] = False  # the way out: start afresh
    train(params, tmp_path, features_dir)
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_with_another_code_length_or_other_features_is_refused(params, tmp_path, features_dir, fusion_ckpt, monkeypatch):
    interrupted(params, tmp_path, features_dir, monkeypatch, bits=16, init_from=fusion_ckpt)
    with pytest.raises(ConfigError, match=r"\(bits differ\)"):
        train(params, tmp_path, features_dir, bits=32, init_from=fusion_ckpt)
    save_pickle(features_dir / "val.pkl", synthetic(16, seed=3))
    with pytest.raises(ConfigError, match=r"\(features differ\)"):
        train(params, tmp_path, features_dir, bits=16, init_from=fusion_ckpt)


def test_resuming_with_another_feature_dim_is_refused(params, tmp_path, features_dir, monkeypatch):
    interrupted(params, tmp_path, features_dir, monkeypatch)
    for split, n in (("train", 48), ("val", 16)):
        save_pickle(features_dir / f"{split}.pkl", synthetic(n, seed=3, dim=8))
    with pytest.raises(ConfigError, match=r"\(feature_dim, features differ\)"):
        train(params, tmp_path, features_dir)


def test_train_hash_starts_from_the_fusion_checkpoint(params, tmp_path, features_dir, fusion_ckpt, monkeypatch):
    start: dict = {}

    def spy(state, *args, **kwargs):
        start.update(copy.deepcopy(state.runner.model.fusion.state_dict()))
        return fit(state, *args, **kwargs)

    monkeypatch.setattr(task_module, "fit", spy)
    train(params, tmp_path, features_dir, bits=16, init_from=fusion_ckpt)
    upstream = torch.load(fusion_ckpt, weights_only=True)["state_dict"]
    fusion_weights = {k.removeprefix("fusion."): v for k, v in upstream.items() if k.startswith("fusion.")}
    assert fusion_weights.keys() == start.keys()
    for name, tensor in fusion_weights.items():
        assert torch.equal(start[name], tensor), name


def test_grad_norm_is_logged_before_clipping(params, tmp_path, features_dir):
    params["train"]["clip_grad_norm"] = 1e-4
    train(params, tmp_path, features_dir)
    summary = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert summary["train"]["grad_norm"] > 1e-4  # the clipped norm would be <= 1e-4
    assert {"fusion"} == set(summary["lr"])
    rows = (tmp_path / "metrics" / "plots" / "metrics" / "train" / "grad_norm.tsv").read_text().splitlines()
    assert len(rows) == 1 + params["train"]["fusion"]["epochs"]  # header + one per epoch


def test_validator_never_sees_the_query_split(params, tmp_path, features_dir, monkeypatch):
    """Selection reads train.pkl and val.pkl only."""
    seen = []
    load = task_module.load_features
    monkeypatch.setattr(task_module, "load_features", lambda path, *a: seen.append(Path(path).name) or load(path, *a))
    train(params, tmp_path, features_dir)
    assert sorted(seen) == ["train.pkl", "val.pkl"]


# ---- train settings, the optimiser, the logged curves ----------------------------------------

MISSING = object()


def set_train(params: dict, dotted: str, value) -> None:
    """params["train"][a][b] = value for "a.b"; MISSING deletes the key."""
    *parents, leaf = dotted.split(".")
    node = params["train"]
    for key in parents:
        node = node[key]
    if value is MISSING:
        del node[leaf]
    else:
        node[leaf] = value


@pytest.mark.parametrize(("key", "value"), [
    ("eval_every", 0), ("eval_every", 1.5), ("eval_every", "2"), ("batch_size", 0), ("batch_size", -16),
    ("fusion.epochs", 0), ("hash.epochs", 0), ("hash.epochs", 2.0),
    ("fusion.lr", 0), ("fusion.lr", -1e-4), ("fusion.lr", "fast"), ("fusion.lr", float("nan")), ("fusion.lr", True),
    ("hash.lr", 0.0), ("hash.fusion_lr", -1e-4), ("hash.fusion_lr", None),
    ("optimizer.adam.betas", [0.9]), ("optimizer.adam.betas", [0.9, 1.0]), ("optimizer.adam.betas", [-0.1, 0.999]),
    ("optimizer.adam.betas", 0.9), ("optimizer.adamw.betas", ["a", 0.999]), ("optimizer.weight_decay", -0.01),
    ("optimizer.sgd.momentum", 1.0), ("optimizer.sgd.momentum", -0.1), ("optimizer.sgd.nesterov", "yes"),
    ("optimizer.rmsprop.alpha", 1.0), ("optimizer.rmsprop.momentum", -0.5), ("optimizer.betas", [0.9, 0.999]),
    ("clip_grad_norm", -1.0), ("patience", -1), ("patience", 2.5), ("min_delta", -0.1), ("hash.hash_weight", -0.5),
    ("select_topk", 0), ("resume", "yes"), ("precision", "fp8"), ("inputs", "image"), ("optimizer.name", "lbfgs"),
])
def test_a_bad_train_setting_stops_before_training_in_one_line_naming_it(params, tmp_path, features_dir, fusion_ckpt,
                                                                         monkeypatch, key, value):
    set_train(params, key, value)
    monkeypatch.setattr(task_module, "load_features", lambda *a: pytest.fail("loaded data before checking the settings"))
    bits = 16 if key.startswith("hash.") else None
    with pytest.raises(ConfigError) as err:
        train(params, tmp_path, features_dir, bits=bits, init_from=fusion_ckpt if bits else None)
    message = str(err.value)
    assert f"train.{key}" in message and "\n" not in message


@pytest.mark.parametrize("key", ["eval_every", "hash.fusion_lr", "optimizer.adam.betas", "optimizer.sgd", "fusion.epochs", "precision",
                                 "hash.hash_weight"])
def test_a_train_setting_left_out_takes_its_default(params, key):
    set_train(params, key, MISSING)
    train = parse_params(params).train
    defaults = TrainConfig()
    for part in key.split("."):
        train, defaults = getattr(train, part), getattr(defaults, part)
    assert train == defaults


def test_valid_edge_values_are_accepted(params, tmp_path, features_dir):
    """The bounds themselves, and a lr PyYAML reads as a string ("1e-4" has no dot)."""
    params["train"].update(patience=0, min_delta=0.0, clip_grad_norm=0.0, eval_every=5, select_topk=1)
    params["train"]["optimizer"].update(weight_decay=0, adam={"betas": [0.0, 0.0]})
    params["train"]["fusion"].update(epochs=1, lr="1e-4")
    assert math.isfinite(train(params, tmp_path, features_dir))


def test_the_optimizer_gets_its_name_betas_weight_decay_and_named_groups(params, tmp_path, features_dir, fusion_ckpt, monkeypatch):
    params["train"]["optimizer"].update(name="adamw", weight_decay=0.01, adamw={"betas": [0.8, 0.95]})
    params["train"]["hash"].update(lr=2e-3, fusion_lr=3e-4)
    seen: dict = {}

    def spy(state, *args, **kwargs):
        model = state.runner.model
        seen["optimizer"] = state.optimizer
        seen["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in state.optimizer.param_groups]
        seen["params"] = [{id(p) for p in g["params"]} for g in state.optimizer.param_groups]
        seen["fusion"] = {id(p) for p in model.fusion.parameters()}
        seen["heads"] = {id(p) for p in [*model.image_head.parameters(), *model.text_head.parameters()]}
        return fit(state, *args, **kwargs)

    monkeypatch.setattr(task_module, "fit", spy)
    train(params, tmp_path, features_dir, bits=16, init_from=fusion_ckpt)
    assert type(seen["optimizer"]) is torch.optim.AdamW
    assert [g["name"] for g in seen["groups"]] == ["fusion", "hash"]
    assert [g["lr"] for g in seen["groups"]] == [3e-4, 2e-3]
    assert all(g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.01 for g in seen["groups"])
    assert seen["params"] == [seen["fusion"], seen["heads"]]  # every weight trained, each in one group


def test_task_0_has_one_param_group_named_fusion_with_its_lr(params, tmp_path, features_dir, monkeypatch):
    params["train"]["optimizer"].update(name="adam", weight_decay=0.0, adam={"betas": [0.5, 0.999]})
    params["train"]["fusion"]["lr"] = 5e-4
    seen = []
    snapshot = lambda opt: (type(opt), [(g["name"], g["lr"], g["betas"]) for g in opt.param_groups])  # noqa: E731
    monkeypatch.setattr(task_module, "fit", lambda state, *a, **k: seen.append(snapshot(state.optimizer)) or fit(state, *a, **k))
    train(params, tmp_path, features_dir)
    assert seen == [(torch.optim.Adam, [("fusion", 5e-4, (0.5, 0.999))])]


def test_an_unknown_optimizer_is_refused_listing_the_valid_names():
    with pytest.raises(ConfigError, match=r"train.optimizer.name = 'lbfgs': unknown optimizer 'lbfgs'; choose one of: adam, adamw, rmsprop, sgd$"):
        parse_params({"train": {"optimizer": {"name": "lbfgs"}}})


def test_nesterov_without_momentum_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"optimizer": {"name": "sgd", "sgd": {"momentum": 0.0, "nesterov": True}}}})
    assert "train.optimizer.sgd" in str(err.value) and "nesterov needs momentum > 0" in str(err.value) and "\n" not in str(err.value)
    assert parse_params({"train": {"optimizer": {"sgd": {"momentum": 0.5, "nesterov": True}}}}).train.optimizer.sgd.nesterov


@pytest.mark.parametrize(("optimizer", "torch_class", "expected"), [
    ({"name": "sgd", "weight_decay": 0.01, "sgd": {"momentum": 0.8, "nesterov": True}}, torch.optim.SGD,
     {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    ({"name": "rmsprop", "rmsprop": {"alpha": 0.9, "momentum": 0.5}}, torch.optim.RMSprop,
     {"alpha": 0.9, "momentum": 0.5, "weight_decay": 0.0}),
])
def test_sgd_and_rmsprop_get_their_knobs_on_every_group(params, tmp_path, features_dir, monkeypatch, optimizer, torch_class, expected):
    params["train"]["optimizer"].update(optimizer)
    params["train"]["fusion"].update(epochs=1)
    seen = []
    monkeypatch.setattr(task_module, "fit", lambda state, *a, **k: seen.append(state.optimizer) or fit(state, *a, **k))
    assert math.isfinite(train(params, tmp_path, features_dir))
    assert type(seen[0]) is torch_class
    for group in seen[0].param_groups:
        assert {key: group[key] for key in expected} == expected


def test_one_sgd_step_with_nesterov_momentum_matches_the_formula():
    """Two steps of build_optimizer's sgd on f(w) = w^2 / 2 (gradient w), by hand: Nesterov
    with momentum m, buffer b = m b + g, update g + m b."""
    from cmhash.training.optimizers import build_optimizer

    cfg = parse_params({"train": {"optimizer": {"name": "sgd", "sgd": {"momentum": 0.5, "nesterov": True}}}}).train.optimizer
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = build_optimizer(cfg, [{"params": [w], "lr": 0.1}])
    expected, buf = 2.0, 0.0
    for _ in range(2):
        opt.zero_grad()
        (w ** 2 / 2).sum().backward()
        g = expected
        buf = 0.5 * buf + g
        expected -= 0.1 * (g + 0.5 * buf)
        opt.step()
        assert w.item() == pytest.approx(expected, rel=1e-6)


def logged(root: Path, name: str) -> dict[int, float]:
    """A dvclive curve as {step: value}; step s is epoch s + 1 (LiveLogger starts at step 0)."""
    rows = (root / "metrics" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", name.split("/")[-1]]
    return {int(step): float(value) for step, value in (row.split("\t") for row in rows[1:])}


def test_the_logged_lr_follows_warm_up_then_cosine(params, tmp_path, features_dir):
    epochs, warmup, base, start, floor = 5, 2, 1e-4, 1e-6, 1e-6
    params["train"]["fusion"].update(epochs=epochs, lr=base)
    params["train"]["hash"]["epochs"] = epochs  # the schedule must fit both tasks' epochs
    params["train"]["schedule"].update(name="cosine", warmup_epochs=warmup, warmup_lr=start)
    params["train"]["schedule"]["cosine"]["eta_min"] = floor
    train(params, tmp_path, features_dir)
    expected = {}
    for epoch in range(epochs):  # 0-based: the lr the epoch trains with
        if epoch < warmup:
            expected[epoch] = start + (base - start) * epoch / warmup
        else:
            expected[epoch] = floor + (base - floor) * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))) / 2
    curve = logged(tmp_path, "lr/fusion")
    assert curve.keys() == expected.keys()
    for epoch, lr in expected.items():
        assert curve[epoch] == pytest.approx(lr, rel=1e-9, abs=0), epoch
    assert curve[warmup] == pytest.approx(base) and curve[epochs - 1] > floor  # the last epoch still learns


def test_a_per_batch_heads_only_schedule_steps_once_a_batch_and_leaves_the_fusion_lr(params, tmp_path, features_dir, fusion_ckpt,
                                                                                      monkeypatch):
    # 48 train pairs in batches of 16: 3 steps an epoch, 9 in 3 epochs; milestones at batches 2 and 4, x2 each
    params["train"]["hash"].update(epochs=3, lr=1e-3, fusion_lr=1e-4)
    params["train"]["schedule"].update(name="multistep", every="batch", groups="hash")
    params["train"]["schedule"]["multistep"] = {"milestones": [2, 4], "gamma": 2.0}
    steps = []
    step = ScheduleStepper.step
    monkeypatch.setattr(ScheduleStepper, "step", lambda self: steps.append(1) or step(self))
    train(params, tmp_path, features_dir, bits=16, init_from=fusion_ckpt)
    assert len(steps) == 3 * 3
    # the lr each epoch's first batch trains with: after 0, 3 and 6 steps
    assert logged(tmp_path, "16/lr/hash") == pytest.approx({0: 1e-3, 1: 2e-3, 2: 4e-3}, rel=1e-12)
    assert logged(tmp_path, "16/lr/fusion") == {0: 1e-4, 1: 1e-4, 2: 1e-4}


def test_validation_runs_every_eval_every_epochs_and_at_the_last(params, tmp_path, features_dir):
    params["train"].update(eval_every=2)
    params["train"]["fusion"]["epochs"] = 5
    train(params, tmp_path, features_dir)
    validated = {2, 4, 5}  # epochs
    train_loss = logged(tmp_path, "train/loss")
    assert set(train_loss) == {epoch - 1 for epoch in range(1, 6)}  # train numbers every epoch
    val = {name: logged(tmp_path, f"val/{name}") for name in ("loss", "map", "val_train_loss_ratio")}
    for name, curve in val.items():
        assert set(curve) == {epoch - 1 for epoch in validated}, name
    for step, ratio in val["val_train_loss_ratio"].items():
        assert ratio == pytest.approx(val["loss"][step] / train_loss[step])  # val over train: above 1 = worse on val
    assert all(0.0 <= m <= 1.0 for m in val["map"].values())
    best = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert best["epoch"] in validated and best["val_map"] == pytest.approx(max(val["map"].values()))


def test_the_overfitting_ratio_is_val_over_train_and_the_summary_flags_it_above_1_5():
    from cmhash.training.hooks import RATIO, LiveLogger, overfitting, val_train_ratio

    assert val_train_ratio(3.0, 2.0) == 1.5 and val_train_ratio(1.0, 4.0) == 0.25  # val loss / train loss
    assert math.isnan(val_train_ratio(1.0, 0.0))
    assert [overfitting({RATIO: r}) for r in (1.2, 1.5, 1.51, 3.0)] == [False, False, True, True]  # strictly above 1.5
    assert not overfitting({}) and not overfitting({RATIO: math.nan})  # not validated this epoch

    class FakeLive:
        def __init__(self) -> None:
            self.summary: dict = {}

        def log_metric(self, name, value) -> None:
            pass

        def next_step(self) -> None:
            pass

    live = FakeLive()
    logger = LiveLogger(live, prefix="16/")
    rows = [{"val/loss": 3.2, "train/loss": 2.0}, {"train/loss": 1.0}, {"val/loss": 2.2, "train/loss": 2.0}]
    flags = []
    for logs in rows:
        if "val/loss" in logs:
            logs[RATIO] = val_train_ratio(logs["val/loss"], logs["train/loss"])
        logger.log({"logs": logs, "best": 0.5, "best_epoch": 1})
        flags.append(live.summary["16"]["overfitting"])
    assert flags == [True, True, False]  # 1.6 flags; an epoch without validation keeps the last verdict; 1.1 clears it


def test_val_loss_uses_batches_sized_as_in_training(params):
    # 20 val pairs in batches of 8: the loss is the mean over the two full batches (items 0-15);
    # a short batch of 4 would give a contrastive loss of another scale (log of the batch size)
    from cmhash.training.engine import full_batch_starts
    from cmhash.training.hooks import Validator

    assert list(full_batch_starts(20, 8)) == [0, 8] and list(full_batch_starts(16, 8)) == [0, 8]
    assert list(full_batch_starts(5, 8)) == [0]  # a single batch is kept, short or not
    data = synthetic(20, seed=3)
    val = FeatureSplit(*(torch.from_numpy(data[k]) for k in ("image", "text", "label")), meta={})
    torch.manual_seed(0)
    model = CrossModalHasher(model_config(params))
    runner = Runner(model, build_loss("contrastive", {"temperature": 0.5}), "strict")
    state = TrainState(runner, None, None, Precision("fp32", torch.device("cpu")), epoch=1, logs={"train/loss": 1.0})
    Validator(val, val, every=1, epochs=1, batch_size=8, topk=5)(state)
    with torch.no_grad():
        expected = np.mean([runner.step(val.image[s : s + 8], val.text[s : s + 8])[0].item() for s in (0, 8)])
    assert state.logs["val/loss"] == pytest.approx(expected, rel=1e-6)


# ---- the per-epoch console line ------------------------------------------------------------------

LINE = re.compile(r"^(?:(?P<bits>\d+) bits: )?epoch (?P<epoch>\d+)/(?P<epochs>\d+)  train loss (?P<train_loss>\S+)  val loss (?P<val_loss>\S+)"
                  r"  val/train (?P<ratio>\S+)  val MAP@50 (?P<map>\S+)(?P<lrs>(?:  lr/\w+ \S+)+)(?P<overfitting>  overfitting)?"
                  r"(?P<best>  best)?$")


def epoch_lines(text: str) -> list[dict]:
    return [m.groupdict() for m in map(LINE.match, text.splitlines()) if m]


def test_the_epoch_line_holds_the_numbers_logged_for_that_epoch(params, tmp_path, features_dir, capsys):
    params["train"].update(eval_every=2)
    params["train"]["fusion"]["epochs"] = 5
    train(params, tmp_path, features_dir)
    lines = epoch_lines(capsys.readouterr().err)
    assert [int(line["epoch"]) for line in lines] == [2, 4, 5]  # each validation, not the other epochs
    curves = {name: logged(tmp_path, name) for name in ("train/loss", "val/loss", "val/val_train_loss_ratio", "val/map", "lr/fusion")}
    best_so_far = -math.inf
    for line in lines:
        step = int(line["epoch"]) - 1
        assert float(line["train_loss"]) == pytest.approx(curves["train/loss"][step], abs=5e-5)
        assert float(line["val_loss"]) == pytest.approx(curves["val/loss"][step], abs=5e-5)
        assert float(line["ratio"]) == pytest.approx(curves["val/val_train_loss_ratio"][step], abs=5e-4)
        assert (line["overfitting"] is not None) == (curves["val/val_train_loss_ratio"][step] > 1.5)
        assert float(line["map"]) == pytest.approx(curves["val/map"][step], abs=5e-5)
        assert line["lrs"] == f"  lr/fusion {curves['lr/fusion'][step]:.3g}"
        assert (line["best"] is not None) == (curves["val/map"][step] > best_so_far)  # a new kept checkpoint
        best_so_far = max(best_so_far, curves["val/map"][step])
    # the last line against the run's summary, metrics/<task>/metrics.json
    summary = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    last = lines[-1]
    assert float(last["train_loss"]) == pytest.approx(summary["train"]["loss"], abs=5e-5)
    assert float(last["val_loss"]) == pytest.approx(summary["val"]["loss"], abs=5e-5)
    assert float(last["map"]) == pytest.approx(summary["val"]["map"], abs=5e-5)
    assert float(last["lrs"].split()[-1]) == pytest.approx(summary["lr"]["fusion"], rel=5e-3)


@pytest.mark.parametrize(("val_loss", "flagged"), [(1.6, True), (1.5, False), (1.1, False)])
def test_the_epoch_line_flags_a_val_train_ratio_above_one_and_a_half(val_loss, flagged):
    from cmhash.training.hooks import RATIO, SELECT, EpochLine

    lines: list[str] = []
    logs = {"train/loss": 1.0, "val/loss": val_loss, RATIO: val_loss / 1.0, SELECT: 0.5, "lr/fusion": 1e-4}
    state = TrainState(None, None, None, None, epoch=3, logs=logs, best_epoch=2)  # 2: not a new kept checkpoint
    EpochLine(epochs=5, topk=50, write=lines.append)(state)
    assert lines == [f"epoch 3/5  train loss 1.0000  val loss {val_loss:.4f}  val/train {val_loss:.3f}  val MAP@50 0.5000"
                     "  lr/fusion 0.0001" + "  overfitting" * flagged]


def test_train_log_epochs_false_prints_no_epoch_line(params, tmp_path, features_dir, capsys):
    params["train"]["log_epochs"] = False
    train(params, tmp_path, features_dir)
    assert epoch_lines(capsys.readouterr().err) == []
    assert (tmp_path / "metrics" / "metrics.json").is_file()  # the curves are logged all the same


def test_the_hash_task_line_names_its_code_length_and_both_lrs(params, tmp_path, features_dir, fusion_ckpt, capsys):
    train(params, tmp_path, features_dir, bits=16, init_from=fusion_ckpt)
    lines = epoch_lines(capsys.readouterr().err)
    assert [(line["bits"], line["epoch"], line["epochs"]) for line in lines] == [("16", "1", "2"), ("16", "2", "2")]
    assert [name for name in lines[0]["lrs"].split() if name.startswith("lr/")] == ["lr/fusion", "lr/hash"]
