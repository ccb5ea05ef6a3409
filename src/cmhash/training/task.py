"""Set up and run one training task: data, optimiser, a runner that owns the loss, hooks, then
initialise from the upstream stage's checkpoint (or resume an interrupted run), fit, and keep the
best checkpoint. Shared by `train-fusion` (task 0) and `train-hash` (task 1)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from dvclive import Live

from cmhash.config import COUNT, NON_NEGATIVE, POSITIVE, Range, choose, get, seed_everything
from cmhash.errors import ConfigError
from cmhash.features import load_features
from cmhash.losses import build_loss, warn_if_small_batch
from cmhash.models import CrossModalHasher, load_checkpoint
from cmhash.training.engine import TrainState, fit
from cmhash.training.hooks import Checkpointer, EarlyStopping, LiveLogger, Validator
from cmhash.training.precision import Precision, resolve_device
from cmhash.training.resume import RunFolder, code_digest, tensor_digest
from cmhash.training.runner import Runner
from cmhash.training.schedule import build_scheduler

log = logging.getLogger("cmhash")

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

RANGES = {"batch_size": COUNT, "eval_every": COUNT, "select_topk": COUNT, "patience": Range(True, 0),
          "min_delta": NON_NEGATIVE, "clip_grad_norm": NON_NEGATIVE, "optimizer.weight_decay": NON_NEGATIVE}
TASK_RANGES = {"fusion": {"epochs": COUNT, "lr": POSITIVE},
               "hash": {"epochs": COUNT, "lr": POSITIVE, "fusion_lr": POSITIVE, "hash_weight": NON_NEGATIVE}}
BETA = Range(False, 0, high=1)  # each of train.optimizer.betas


def check_train(params: dict[str, Any], task: str) -> None:
    """Every `train` setting the task reads, checked before anything is loaded or trained: a missing
    key or a bad value is one ConfigError line naming it. The named choices (inputs, precision,
    optimizer.name) and train.schedule are checked where they are built, also before training."""
    for key in ("inputs", "precision", "schedule", "optimizer.name"):
        get(params, f"train.{key}")
    resume = get(params, "train.resume")
    if not isinstance(resume, bool):
        raise ConfigError(f"train.resume must be true or false, got {resume!r}")
    ranges = {**RANGES, **{f"{task}.{key}": r for key, r in TASK_RANGES[task].items()}}
    for key, allowed in ranges.items():
        allowed.check(f"train.{key}", get(params, f"train.{key}"))
    betas = get(params, "train.optimizer.betas")
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(BETA.holds(b) for b in betas)):
        raise ConfigError(f"train.optimizer.betas must be a list of two numbers, each {BETA}, got {betas!r}")


def build_optimizer(cfg: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """`train.optimizer` (checked by check_train) over the named param groups."""
    name = choose(cfg["name"], OPTIMIZERS, "train.optimizer.name")
    return OPTIMIZERS[name](groups, betas=tuple(float(b) for b in cfg["betas"]), weight_decay=float(cfg["weight_decay"]))


def open_live(folder: Path) -> Live:
    """dvclive curves (plots/metrics/) and summary (metrics.json) in `folder`; dvc.yaml, not
    dvclive, declares them to DVC."""
    return Live(str(folder), save_dvc_exp=False, dvcyaml=False)


def fingerprint(params: dict[str, Any], task: str, config: dict[str, Any], data: list[torch.Tensor],
                init: list[torch.Tensor]) -> dict[str, Any]:
    """What a run's result depends on; a run resumes only into the same fingerprint. train.resume
    is left out (it does not change the result), and so is the other task's train.<task>."""
    t = get(params, "train")
    return {
        "seed": get(params, "seed"), "loss": config["loss"], "losses": {config["loss"]: get(params, "losses").get(config["loss"])},
        "model": config["model"], "bits": config["bits"], "feature_dim": config["feature_dim"],
        "train": {**{k: v for k, v in t.items() if k not in ("resume", "fusion", "hash")}, task: t[task]},
        "features": tensor_digest(data), "init": tensor_digest(init) if init else None, "code": code_digest(),
    }


def train_task(params: dict[str, Any], *, features_dir: Path, out_path: Path, live: Live, checkpoint_dir: Path,
               bits: int | None = None, init_from: Path | None = None) -> float:
    """Train task 0 (bits=None) or task 1 (bits=code length); returns the best val MAP. The
    unfinished run's state lives in `checkpoint_dir` (see cmhash.training.resume). Task 1's code
    lengths share one `live`: their curves are named `<bits>/...`, each starting at step 0."""
    task = "hash" if bits else "fusion"
    check_train(params, task)
    seed_everything(int(get(params, "seed")))
    device = resolve_device(str(get(params, "device")))
    train, val = (load_features(features_dir / f"{split}.pkl", device) for split in ("train", "val"))
    t = get(params, "train")
    resume = get(params, "train.resume")
    loss_name = str(get(params, "loss"))
    loss = build_loss(loss_name, get(params, "losses").get(loss_name) or {})
    warn_if_small_batch(loss, int(t["batch_size"]))

    config = {"model": dict(get(params, "model")), "feature_dim": train.dim, "bits": bits, "loss": loss_name,
              "clip": {k: train.meta.get(k) for k in ("clip_model", "pretrained", "random_init")}}
    model = CrossModalHasher(config).to(device)
    init: list[torch.Tensor] = []
    if init_from is not None:  # task 1 starts from the fusion stage's weights, then fine-tunes them
        upstream, _ = load_checkpoint(init_from, device)
        if upstream.config["model"] != config["model"] or upstream.config["feature_dim"] != train.dim:
            raise ConfigError(f"{init_from} was trained with another model config; re-run `cmhash train-fusion`")
        model.fusion.load_state_dict(upstream.fusion.state_dict())
        init = list(upstream.fusion.state_dict().values())

    stage = t[task]
    groups = [{"name": "fusion", "params": model.fusion.parameters(), "lr": float(stage["fusion_lr" if bits else "lr"])}]
    if bits:
        heads = [*model.image_head.parameters(), *model.text_head.parameters()]
        groups.append({"name": "hash", "params": heads, "lr": float(stage["lr"])})
    optimizer = build_optimizer(t["optimizer"], groups)
    epochs = int(stage["epochs"])
    state = TrainState(
        runner=Runner(model, loss, str(t["inputs"]), float(stage["hash_weight"]) if bits else None),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, t["schedule"], epochs),
        precision=Precision(str(t["precision"]), device),
    )
    run = RunFolder(checkpoint_dir, fingerprint(params, task, config, [train.image, train.text, train.label, val.image, val.text, val.label], init))
    live.step = 0
    hooks = [
        Validator(val, train, every=int(t["eval_every"]), epochs=epochs, batch_size=int(t["batch_size"]), topk=int(t["select_topk"])),
        Checkpointer(run.best_path),
        EarlyStopping(int(t["patience"]), float(t["min_delta"])),
        LiveLogger(live, prefix=f"{bits}/" if bits else ""),
    ]
    generator = torch.Generator().manual_seed(int(get(params, "seed")))
    log.info("%s: %d train / %d val pairs, loss %s, %d epochs on %s", task, len(train), len(val), loss_name, epochs, device)
    run.start(state, generator, hooks, resume=resume)
    fit(state, train, epochs=epochs, batch_size=int(t["batch_size"]), clip_grad_norm=float(t["clip_grad_norm"]), hooks=[*hooks, run], generator=generator)
    run.finish(out_path)
    log.info("%s: best val MAP@%s %.4f at epoch %d", task, t["select_topk"], state.best, state.best_epoch)
    return state.best
