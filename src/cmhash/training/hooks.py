"""Hooks run after every epoch, in list order: validate, then checkpoint, stop early, log, print
the epoch's line (then cmhash.training.resume.RunFolder saves the run). A hook with state that a resumed run
needs back has state_dict()/load_state_dict(). Under several processes rank 0 alone runs these
hooks (OnMainRank) and the other ranks follow its decisions."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from cmhash.evaluation.ranking import cosine_map, mean_average_precision
from cmhash.evaluation.recall import group_ids, paired_recall
from cmhash.features.store import FeatureSplit
from cmhash.models import encode, save_checkpoint, to_codes
from cmhash.runtime.distributed import World, broadcast
from cmhash.training.engine import Hook, TrainState, full_batch_starts
from cmhash.training.monitor import Meter, pair_stats

SELECT = "val/map"  # the number model selection and early stopping watch
RATIO = "val/val_train_loss_ratio"  # val loss / train loss, the overfitting check
OVERFIT_RATIO = 1.5  # above: overfitting, add dropout and weight decay
EASE_RATIO = 1.2  # below: regularisation can be eased


def val_train_ratio(val_loss: float, train_loss: float) -> float:
    """Val loss / train loss (nan when the train loss is 0): the number the overfitting rule reads."""
    return val_loss / train_loss if train_loss else math.nan


def overfitting(logs: dict[str, float]) -> bool:
    """True when this epoch was validated and its val/train loss ratio is above OVERFIT_RATIO."""
    return logs.get(RATIO, math.nan) > OVERFIT_RATIO


class Validator:
    """Every `every` epochs (and at the last): val loss and monitor stats (over batches sized as
    in training, so the short last one is left out), the val/train loss
    ratio (RATIO), and val MAP@k - val pairs as queries against the train pairs as database, strict
    protocol, cosine for embeddings (task 0) or Hamming for codes (task 1). Never the query set.
    A collection without labels is selected on val Recall@k of the paired item instead (val
    images against val captions: the pair's partner must be in the database)."""

    def __init__(self, val: FeatureSplit, database: FeatureSplit, *, every: int, epochs: int, batch_size: int, topk: int) -> None:
        self.val, self.database = val, database
        self.every, self.epochs, self.batch_size, self.topk = every, epochs, batch_size, topk

    @torch.no_grad()
    def __call__(self, state: TrainState) -> None:
        if state.epoch % self.every and state.epoch != self.epochs:
            return
        runner, meter = state.runner, Meter()
        runner.model.eval()
        for start in full_batch_starts(len(self.val), self.batch_size):  # batches sized as in training
            with state.precision.autocast():
                loss, outputs = runner.step(self.val.image[start : start + self.batch_size], self.val.text[start : start + self.batch_size],
                                            local=True)
            meter.add(len(outputs[0]), {"loss": loss.item(), **pair_stats(*outputs)})
        state.logs.update(meter.means("val"))
        state.logs[RATIO] = val_train_ratio(state.logs["val/loss"], state.logs["train/loss"])
        if self.val.label.shape[1]:
            i2t, t2i = self.retrieval_map(runner.model, runner.hashing)
            state.logs.update({"val/map_i2t": i2t, "val/map_t2i": t2i, SELECT: (i2t + t2i) / 2})
        else:  # no labels: Recall@k of the paired item within val selects instead (the key stays SELECT)
            i2t, t2i = self.retrieval_recall(runner.model, runner.hashing)
            state.logs.update({"val/recall_i2t": i2t, "val/recall_t2i": t2i, SELECT: (i2t + t2i) / 2})

    def retrieval_recall(self, model, hashing: bool) -> tuple[float, float]:
        image, text = encode(model, self.val.image, self.val.text, "strict")
        prepare = (lambda x: to_codes(x).cpu().numpy()) if hashing else (lambda x: x.float().cpu().numpy())
        groups = group_ids(self.val.meta.get("groups"), len(self.val))
        scores = paired_recall(prepare(image), prepare(text), groups, [self.topk], "hamming" if hashing else "cosine")
        key = f"recall@{self.topk}"
        return scores["i2t"][key], scores["t2i"][key]

    def retrieval_map(self, model, hashing: bool) -> tuple[float, float]:
        q_image, q_text = encode(model, self.val.image, self.val.text, "strict")
        db_image, db_text = encode(model, self.database.image, self.database.text, "strict")
        q_label, db_label = self.val.label.cpu().numpy(), self.database.label.cpu().numpy()
        score = mean_average_precision if hashing else cosine_map
        prepare = (lambda x: to_codes(x).cpu().numpy()) if hashing else (lambda x: x.float().cpu().numpy())
        i2t = score(prepare(q_image), prepare(db_text), q_label, db_label, topk=(self.topk,))[self.topk]
        t2i = score(prepare(q_text), prepare(db_image), q_label, db_label, topk=(self.topk,))[self.topk]
        return float(i2t), float(t2i)


class OnMainRank:
    """Runs `hooks` on rank 0 alone - validation, checkpoints, early stopping, logging: one
    process measures, decides and writes - then hands every rank rank 0's epoch numbers and
    decisions (logs, best, best_epoch, stop). On one process: just the hooks."""

    def __init__(self, hooks: list[Hook], world: World) -> None:
        self.hooks, self.world = hooks, world

    def __call__(self, state: TrainState) -> None:
        if self.world.main:
            for hook in self.hooks:
                hook(state)
        if self.world.distributed:
            state.logs, state.best, state.best_epoch, state.stop = broadcast((state.logs, state.best, state.best_epoch, state.stop))


class Checkpointer:
    """Keeps the checkpoint with the best val MAP as the stage's output."""

    def __init__(self, best_path: Path, **extra) -> None:
        self.best_path, self.extra = best_path, extra

    def __call__(self, state: TrainState) -> None:
        score = state.logs.get(SELECT)
        if score is not None and score > state.best:
            state.best, state.best_epoch = score, state.epoch
            save_checkpoint(self.best_path, state.runner.model, epoch=state.epoch, val_map=score, **self.extra)


class EarlyStopping:
    """Stops after `patience` validations without a gain of more than `min_delta` (0 = off)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad = -math.inf, 0

    def __call__(self, state: TrainState) -> None:
        score = state.logs.get(SELECT)
        if score is None or not self.patience:
            return
        if score > self.best + self.min_delta:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
            state.stop = self.bad >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, saved: dict[str, float]) -> None:
        self.best, self.bad = saved["best"], int(saved["bad"])


class LiveLogger:
    """Every number of the epoch as a dvclive step curve (names prefixed, e.g. `16/train/loss`, when
    several runs share one Live); best-so-far in the summary, under the prefix, and `overfitting`:
    whether the last validated epoch's val/train loss ratio is above OVERFIT_RATIO. Keeps the rows it
    logged so a resumed run can write the earlier epochs' curves again: `dvc repro` deletes a
    stage's outputs, metrics included, before it re-runs the stage."""

    def __init__(self, live, prefix: str = "") -> None:
        self.live, self.prefix = live, prefix
        self.history: list[dict] = []

    def __call__(self, state: TrainState) -> None:
        self.log({"logs": dict(state.logs), "best": state.best, "best_epoch": state.best_epoch})

    def log(self, row: dict) -> None:
        for name, value in row["logs"].items():
            self.live.log_metric(self.prefix + name, value)
        summary = self.live.summary.setdefault(self.prefix.rstrip("/"), {}) if self.prefix else self.live.summary
        summary.update({"best_val_map": row["best"], "best_epoch": row["best_epoch"]})
        if RATIO in row["logs"]:
            summary["overfitting"] = overfitting(row["logs"])
        self.live.next_step()
        self.history.append(row)

    def state_dict(self) -> dict[str, list[dict]]:
        return {"history": self.history}

    def load_state_dict(self, saved: dict[str, list[dict]]) -> None:
        for row in saved["history"]:
            self.log(row)


# The numbers of the per-epoch console line, in order: (label, key in the epoch's logs, format).
# Adding one is one entry; every learning rate (lr/<group>) follows them.
EPOCH_LINE = [("train loss", "train/loss", ".4f"), ("val loss", "val/loss", ".4f"), ("val/train", RATIO, ".3f"),
              ("val MAP@{k}", SELECT, ".4f")]


def _stderr_line(line: str) -> None:
    # a fresh Console writes to the sys.stderr of the moment: the live progress bar's, which
    # prints the line above the bar and redraws the bar under it
    Console(stderr=True, soft_wrap=True).print(line, markup=False, highlight=False)


class EpochLine:
    """At each validation, one line on the console: epoch, train loss, val loss, their ratio, val
    MAP@K and the learning rates, the same numbers the dvclive curves get; `overfitting` flags a
    ratio above OVERFIT_RATIO and `best` marks a new kept checkpoint.
    train.log_epochs: false leaves it out. Rank 0 alone runs it (OnMainRank)."""

    def __init__(self, epochs: int, topk: int, prefix: str = "", write: Callable[[str], None] = _stderr_line) -> None:
        self.epochs, self.topk, self.prefix, self.write = epochs, topk, prefix, write

    def __call__(self, state: TrainState) -> None:
        logs = state.logs
        if SELECT not in logs:  # not a validation epoch
            return
        parts = [f"{self.prefix}epoch {state.epoch}/{self.epochs}"]
        parts += [f"{label.format(k=self.topk)} {logs[key]:{fmt}}" for label, key, fmt in EPOCH_LINE if key in logs]
        parts += [f"{key} {value:.3g}" for key, value in logs.items() if key.startswith("lr/")]
        parts += ["overfitting"] * overfitting(logs) + ["best"] * (state.best_epoch == state.epoch)
        self.write("  ".join(parts))
