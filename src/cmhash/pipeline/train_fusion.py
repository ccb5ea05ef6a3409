"""Stage `train-fusion` (task 0): the fusion transformer, trained with `loss` on CLIP features.

reads   stages/extract/{train,val}.pkl
writes  stages/fusion/model.pt (best val MAP), metrics/fusion/ (dvclive curves + summary)
keeps   checkpoints/fusion/ while unfinished (git-ignored, not a DVC out): a re-run resumes it
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
    return TaskSettings.of(p, "fusion").reads("fusion")


def command(
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="feature files from `cmhash extract`.")] = Path("stages/extract"),
    out: Annotated[Path, typer.Option(help="best checkpoint (by val MAP).")] = Path("stages/fusion/model.pt"),
    metrics_dir: Annotated[Path, typer.Option(help="dvclive curves and summary.")] = Path("metrics/fusion"),
    checkpoints: Annotated[Path, typer.Option(help="an unfinished run's state (last.pt, best.pt), to resume from.")] = Path("checkpoints/fusion"),
) -> None:
    """Task 0: train the fusion transformer; keep the checkpoint with the best val MAP."""
    run(TaskSettings.of(load_params(params), "fusion"), features_dir, out, metrics_dir, checkpoints)


def run(settings: TaskSettings, features_dir: Path, out: Path, metrics_dir: Path, checkpoints: Path) -> None:
    from cmhash.training.task import open_live, train_task

    with open_live(metrics_dir) as live:
        train_task(settings, features_dir=features_dir, out_path=out, live=live, checkpoint_dir=checkpoints)
