"""Stage `train-hash` (task 1): hash heads on the fusion model, one model per code length.

reads   stages/extract/{train,val}.pkl, stages/fusion/model.pt (initial fusion weights; not read with
        train.hash.init: scratch, which starts from a fresh, seeded fusion model as the public code does),
        stages/baselines/cca_itq/<bits>.npz (with hash_head.init: cca_itq: each head's linear path
        starts at CCA-ITQ's projection)
writes  stages/hash/<bits>/model.pt (best val MAP), metrics/hash/ (one dvclive folder: curves
        `<bits>/train/loss`..., summary {"<bits>": {...}})
keeps   checkpoints/hash/<bits>/ while unfinished (git-ignored, not a DVC out): a re-run resumes it
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cmhash.config.options import ParamsOption
from cmhash.config.schema import Params, load_params
from cmhash.config.stages import TaskSettings


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return {**TaskSettings.of(p, "hash").reads("hash"), "bits": p.bits}


def command(
    params: ParamsOption = Path("params.yaml"),
    bits: Annotated[list[int] | None, typer.Option(help="code length(s); default: `bits` in params.")] = None,
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract`.")] = Path("stages/extract"),
    fusion: Annotated[Path, typer.Option(help="task-0 checkpoint to start from, with train.hash.init: fusion.")] = Path("stages/fusion/model.pt"),
    out_dir: Annotated[Path, typer.Option(help="writes <out-dir>/<bits>/model.pt.")] = Path("stages/hash"),
    metrics_dir: Annotated[Path, typer.Option(help="dvclive curves and summary, keyed by code length.")] = Path("metrics/hash"),
    checkpoints: Annotated[Path, typer.Option(help="unfinished runs' state, <checkpoints>/<bits>/, to resume from.")] = Path("checkpoints/hash"),
    baselines_dir: Annotated[Path, typer.Option(help="`cmhash baselines` output, read with hash_head.init: cca_itq.")] = Path("stages/baselines"),
) -> None:
    """Task 1: train hash heads (and fine-tune fusion) for every code length."""
    p = load_params(params)
    run(TaskSettings.of(p, "hash"), bits or p.bits, features_dir, fusion, out_dir, metrics_dir, checkpoints, baselines_dir)


def run(settings: TaskSettings, bits: list[int], features_dir: Path, fusion: Path, out_dir: Path, metrics_dir: Path,
        checkpoints: Path, baselines_dir: Path = Path("stages/baselines")) -> None:
    from cmhash.training.task import open_live, train_task

    init_from = fusion if settings.task.init == "fusion" else None  # scratch: the seeded model train_task builds
    cca_itq = settings.hash_head.init == "cca_itq"
    with open_live(metrics_dir) as live:
        for b in bits:
            train_task(settings, features_dir=features_dir, out_path=out_dir / str(b) / "model.pt", live=live,
                       checkpoint_dir=checkpoints / str(b), bits=b, init_from=init_from,
                       heads_from=baselines_dir / "cca_itq" / f"{b}.npz" if cca_itq else None)
