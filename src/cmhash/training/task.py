"""Set up and run one training task: data, optimiser, a runner that owns the loss, hooks, then
initialise from the upstream stage's checkpoint (or resume an interrupted run), fit, and keep the
best checkpoint. Shared by `train-fusion` (task 0) and `train-hash` (task 1).

Under torchrun every rank runs this with the same settings: it trains on its share of each global
batch (cmhash.training.engine) with a DDP-wrapped model, while rank 0 alone validates, logs,
checkpoints and writes the outputs (cmhash.training.hooks.OnMainRank, RunFolder)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from dvclive import Live

from cmhash.config.stages import TaskSettings
from cmhash.digests import code_digest
from cmhash.errors import ConfigError, DataError
from cmhash.features.store import check_width, load_features
from cmhash.io import atomic_dir
from cmhash.losses import warn_if_small_batch
from cmhash.models import CrossModalHasher, ModelConfig, load_checkpoint
from cmhash.runtime.device import resolve_device
from cmhash.runtime.distributed import World, check_batch_split, current_world
from cmhash.runtime.seeding import reseed_rank, seed_everything
from cmhash.training.augment import FeatureAugment
from cmhash.training.engine import fit, full_batch_starts
from cmhash.training.hooks import Checkpointer, EarlyStopping, EpochLine, LiveLogger, OnMainRank, Validator
from cmhash.training.resume import RunFolder, tensor_digest
from cmhash.training.state import build_state, model_config

log = logging.getLogger("cmhash")


@contextmanager
def open_live(folder: Path) -> Iterator[Live | None]:
    """dvclive curves (plots/metrics/) and summary (metrics.json) in `folder`; dvc.yaml, not
    dvclive, declares them to DVC. dvclive clears its folder when it starts, so it writes beside
    `folder`, which it replaces only when the run succeeds: a failed run keeps the last good curves
    (a resumed run restores the curves logged so far from last.pt). Ranks other than 0 log
    nothing and touch no folder: None."""
    if not current_world().main:
        yield None
        return
    with atomic_dir(folder) as tmp, Live(str(tmp), save_dvc_exp=False, dvcyaml=False) as live:
        yield live


def resume_fingerprint(settings: TaskSettings, task: str, model: ModelConfig, data: list[torch.Tensor], init: list[torch.Tensor],
                world: World) -> dict[str, Any]:
    """What a run's result depends on; a run resumes only into the same fingerprint. train.resume
    train.log_epochs and the `distributed` section are left out (they do not change the result; the number of
    processes, which decides every rank's random streams, is in as world_size)."""
    reads = {key: value.model_dump() if hasattr(value, "model_dump") else value for key, value in settings.reads(task).items()}
    reads.pop("train.resume")
    reads.pop("train.log_epochs")
    reads.pop("distributed")
    return {"settings": reads, "world_size": world.size, "bits": model.bits, "feature_dim": model.feature_dim,
            "features": tensor_digest(data), "init": tensor_digest(init) if init else None, "code": code_digest("cmhash.training.task")}


def start_heads(model: CrossModalHasher, path: Path, device: torch.device) -> list[torch.Tensor]:
    """Start each head's linear path at a linear hash of the baselines stage (its means and
    projections in `path`, an .npz); returns them for the resume fingerprint."""
    import numpy as np

    if not path.is_file():
        raise DataError(f"{path} not found: hash_head.init: cca_itq starts from the baselines stage's CCA-ITQ; run `cmhash baselines` "
                        "with cca_itq in baselines.methods and this code length in bits")
    with np.load(path, allow_pickle=False) as saved:
        arrays = {k: torch.from_numpy(np.asarray(saved[k], dtype=np.float32)).to(device)
                  for k in ("image_mean", "image_projection", "text_mean", "text_projection")}
    if arrays["image_projection"].shape != (model.config.feature_dim, model.config.bits):
        raise DataError(f"{path} projects {tuple(arrays['image_projection'].shape)}, not ({model.config.feature_dim}, {model.config.bits}); "
                        "re-run `cmhash baselines` on these features")
    model.image_head.start_from(arrays["image_mean"], arrays["image_projection"])
    model.text_head.start_from(arrays["text_mean"], arrays["text_projection"])
    return list(arrays.values())


def train_task(settings: TaskSettings, *, features_dir: Path, out_path: Path, live: Live | None, checkpoint_dir: Path,
               bits: int | None = None, init_from: Path | None = None, heads_from: Path | None = None) -> float:
    """Train task 0 (bits=None) or task 1 (bits=code length); returns the best val MAP. The
    unfinished run's state lives in `checkpoint_dir` (see cmhash.training.resume). Task 1's code
    lengths share one `live`: their curves are named `<bits>/...`, each starting at step 0.
    Under several processes every rank calls this; `live` is rank 0's (None on the others)."""
    task = "hash" if bits else "fusion"
    t, stage = settings.train, settings.task
    world = current_world()
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    train, val = (load_features(features_dir / f"{split}.pkl", device) for split in ("train", "val"))
    check_batch_split(t.batch_size, len(train), world)
    config = model_config(settings, train.dim, bits, {k: train.meta.get(k) for k in ("clip_model", "pretrained", "random_init")})
    state = build_state(settings, config, device, world=world, batches_per_epoch=len(full_batch_starts(len(train), t.batch_size)))
    if world.main:  # one warning for the job; the loss sees the global batch
        warn_if_small_batch(state.runner.loss, t.batch_size)
    init: list[torch.Tensor] = []
    if init_from is not None:  # task 1 starts from the fusion stage's weights, then fine-tunes them
        upstream, _ = load_checkpoint(init_from, device)
        check_width(train, features_dir / "train.pkl", init_from, upstream.config.feature_dim)
        if upstream.config.fusion_part() != config.fusion_part():
            raise ConfigError(f"{init_from} was trained with another model config; re-run `cmhash train-fusion`")
        state.runner.model.fusion.load_state_dict(upstream.fusion.state_dict())
        init = list(upstream.fusion.state_dict().values())
    if heads_from is not None:  # hash_head.init: cca_itq: both heads start from the baseline's projection
        init += start_heads(state.runner.model, heads_from, device)
    reseed_rank(settings.seed, world.rank)  # the same initial weights on every rank, dropout of its own
    data = [train.image, train.text, train.label, val.image, val.text, val.label]
    run = RunFolder(checkpoint_dir, resume_fingerprint(settings, task, config, data, init, world), world)
    hooks = []  # rank 0's: the other ranks follow its decisions
    if world.main:
        live.step = 0
        hooks = [
            Validator(val, train, every=t.eval_every, epochs=stage.epochs, batch_size=t.batch_size, topk=t.select_topk),
            Checkpointer(run.best_path),
            EarlyStopping(t.patience, t.min_delta),
            LiveLogger(live, prefix=f"{bits}/" if bits else ""),
        ]
        if t.log_epochs:
            hooks.append(EpochLine(stage.epochs, t.select_topk, prefix=f"{bits} bits: " if bits else ""))
    log.info("%s: %d train / %d val pairs, loss %s, %d epochs on %s", task, len(train), len(val), settings.loss, stage.epochs, device)
    generator = torch.Generator().manual_seed(settings.seed)  # the batch order: the same on every rank
    run.start(state, generator, hooks, resume=t.resume)
    fit(state, train, epochs=stage.epochs, batch_size=t.batch_size, clip_grad_norm=t.clip_grad_norm,
        hooks=[OnMainRank(hooks, world), run], generator=generator, augment=FeatureAugment(t.augment, generator, world))
    run.finish(out_path)
    log.info("%s: best val %s@%s %.4f at epoch %d", task, "MAP" if val.label.shape[1] else "Recall", t.select_topk, state.best, state.best_epoch)
    return state.best
