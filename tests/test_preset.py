"""params/ucmfh-reference.yaml, the public UCMFH code's training recipe: a valid, complete params
file (exactly params.yaml's keys) holding the recipe's values; the two ways docs/reference-recipe.md
runs it (every stage with --params, and a `dvc exp run -S ...` command that must turn params.yaml
into the preset when DVC applies it); and the page's claim that validating only at the last epoch
keeps the last epoch's model."""

from __future__ import annotations

import inspect
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from dvc.cli import parse_args
from dvc.utils.hydra import apply_overrides

from cmhash.cli import STAGES
from cmhash.config.schema import Params, load_params
from cmhash.io import save_pickle
from test_training import synthetic, train

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "params" / "ucmfh-reference.yaml"
PAGE = REPO / "docs" / "reference-recipe.md"

# The public code's recipe, as its code runs it (its demo.py, ICMR.py, model.py, metric.py), by key.
RECIPE = {
    "seed": 2023,
    "loss": "contrastive", "losses.contrastive.temperature": 0.5,
    "bits": [16, 32, 64, 128],
    "data.name": "features", "data.root": "data/ucmfh",
    "model.arch": "reference", "model.reference.d_model": None, "model.reference.nhead": 4, "model.reference.num_layers": 2,
    "model.reference.dim_feedforward": 2048, "model.reference.dropout": 0.1,
    "hash_head.hidden": 4096, "hash_head.dropout": 0.3,
    "train.inputs": "paired", "train.batch_size": 128, "train.precision": "fp32", "train.clip_grad_norm": 0.0, "train.patience": 0,
    "train.optimizer.name": "adam", "train.optimizer.adam.betas": [0.5, 0.999], "train.optimizer.weight_decay": 0.0,
    "train.schedule.name": "multistep", "train.schedule.warmup_epochs": 0, "train.schedule.every": "batch", "train.schedule.groups": "hash",
    "train.schedule.multistep.milestones": [30, 80], "train.schedule.multistep.gamma": 1.2,
    "train.fusion.epochs": 50, "train.fusion.lr": 1e-4,
    "train.hash.epochs": 50, "train.hash.lr": 1e-3, "train.hash.fusion_lr": 1e-4, "train.hash.hash_weight": 0.5, "train.hash.init": "scratch",
    "evaluate.topk": [50],
}


def read(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def key_paths(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a YAML mapping, sections included (so `losses.mse: {}` counts), with its value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out[prefix + key] = value
        if isinstance(value, dict):
            out.update(key_paths(value, f"{prefix}{key}."))
    return out


def page_blocks() -> list[str]:
    """The bash code blocks of docs/reference-recipe.md, backslash-continued lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def page_dvc_overrides() -> list[str]:
    """The `-S key=value` overrides of the page's one `dvc exp run` command, read by DVC's own parser."""
    (command,) = [line for block in page_blocks() for line in block.splitlines() if "dvc exp run" in line]
    argv = shlex.split(command)
    assert argv[:3] == ["dvc", "exp", "run"], command
    return parse_args(argv[1:]).set_param


def test_the_preset_is_valid_params():
    assert isinstance(load_params(PRESET), Params)


def test_the_preset_has_exactly_the_keys_of_params_yaml():
    """Complete: it can replace params.yaml, and a key added to params.yaml must be added here too."""
    assert sorted(key_paths(read(PRESET))) == sorted(key_paths(read(REPO / "params.yaml")))


def test_the_preset_holds_the_public_codes_recipe():
    preset = key_paths(read(PRESET))
    assert {key: preset[key] for key in RECIPE} == RECIPE


def setting_lines(text: str) -> dict[str, str]:
    """The line that sets each dotted key of a block-style YAML file (a one-line {...} mapping's keys
    share its line)."""
    lines: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = re.match(r"(\s*)([A-Za-z_]+):\s*(.*)", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        stack = [(i, k) for i, k in stack if i < indent]
        path = ".".join([k for _, k in stack] + [key])
        lines[path] = line
        value = yaml.safe_load(f"{key}: {rest}")[key]
        if isinstance(value, dict):
            lines.update({f"{path}.{sub}": line for sub in value})
        stack.append((indent, key))
    return lines


def test_the_preset_marks_every_recipe_value_as_the_public_codes():
    """The comment on each line that sets a recipe value says so (data.root is ours: where the files are put)."""
    lines = setting_lines(PRESET.read_text(encoding="utf-8"))
    unmarked = [key for key in RECIPE if key != "data.root" and "the public code" not in lines[key].partition("#")[2]]
    assert unmarked == []


def test_every_stage_command_takes_params_and_the_page_runs_each_with_the_preset():
    assert all("params" in inspect.signature(command).parameters for command in STAGES.values())
    runs = [shlex.split(line) for block in page_blocks() for line in block.splitlines() if line.startswith("cmhash ")]
    assert runs == [["cmhash", stage, "--params", "params/ucmfh-reference.yaml"] for stage in STAGES]


def test_the_pages_dvc_command_turns_params_yaml_into_the_preset(tmp_path):
    """`dvc exp run -S ...` edits a copy of params.yaml the way DVC does (its own apply_overrides);
    the result must be the preset, value for value."""
    edited = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", edited)
    apply_overrides(edited, page_dvc_overrides())
    assert read(edited) == read(PRESET)


def test_the_pages_dvc_command_sets_only_keys_where_the_preset_differs():
    """The page says so: a key already at the preset's value in params.yaml has no override."""
    committed, preset = key_paths(read(REPO / "params.yaml")), key_paths(read(PRESET))
    keys = [override.split("=", 1)[0] for override in page_dvc_overrides()]
    assert len(keys) == len(set(keys))
    assert [key for key in keys if committed[key] == preset[key]] == []


def test_validating_only_at_the_last_epoch_keeps_the_last_epochs_model(params, tmp_path):
    """The page's stand-in for the public code's last-epoch model: train.eval_every=50, more than the epochs."""
    features = tmp_path / "features"
    save_pickle(features / "train.pkl", synthetic(48, seed=1))
    save_pickle(features / "val.pkl", synthetic(16, seed=2))
    params["train"]["fusion"]["epochs"] = 3
    params["train"]["eval_every"] = 50
    train(params, tmp_path, features)
    assert torch.load(tmp_path / "out" / "model.pt", weights_only=True)["epoch"] == 3
    val_map = (tmp_path / "metrics" / "plots" / "metrics" / "val" / "map.tsv").read_text().splitlines()
    assert len(val_map) == 1 + 1  # header + the one validation, at epoch 3
