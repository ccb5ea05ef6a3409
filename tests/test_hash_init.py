"""`train.hash.init`: task 1 fine-tunes task 0's model (`fusion`, the default) or starts from a
fresh, seeded fusion model and never reads the task-0 checkpoint (`scratch`, the public code).
Through `cmhash train-fusion` / `cmhash train-hash` on tiny synthetic features, with the fusion
weights caught as task 1's training starts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from cmhash.config.schema import parse_params
from cmhash.errors import ConfigError
from cmhash.models import CrossModalHasher
from cmhash.training import task as task_module
from test_training import model_config


@pytest.fixture
def start_weights(monkeypatch) -> dict[str, torch.Tensor]:
    """The fusion weights task 1 starts training from (filled when `fit` is called)."""
    seen: dict[str, torch.Tensor] = {}
    fit = task_module.fit

    def spy(state, *args, **kwargs):
        seen.update(copy.deepcopy(state.runner.model.fusion.state_dict()))
        return fit(state, *args, **kwargs)

    monkeypatch.setattr(task_module, "fit", spy)
    return seen


def stage(invoke, name: str, params: dict, root: Path, features_dir: Path, *extra) -> None:
    """`cmhash <name>` with `params`, every path under `root`."""
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    outputs = {"train-fusion": ["--out", root / "fusion.pt"], "train-hash": ["--out-dir", root / "hash", "--bits", 16]}[name]
    result = invoke(name, "--params", root / "params.yaml", "--features-dir", features_dir, "--metrics-dir", root / f"metrics-{name}",
                    "--checkpoints", root / f"checkpoints-{name}", *outputs, *extra)
    assert result.exit_code == 0, result.output
    assert not (root / f"checkpoints-{name}").exists()  # a finished run leaves no folder, empty or not


def fusion_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k.removeprefix("fusion."): v for k, v in state.items() if k.startswith("fusion.")}


def fresh_fusion(params: dict) -> dict[str, torch.Tensor]:
    """What a task-1 model's fusion part is right after torch is seeded with `seed`."""
    torch.manual_seed(params["seed"])
    return CrossModalHasher(model_config(params, bits=16)).fusion.state_dict()


def test_scratch_starts_from_a_fresh_seeded_fusion_model_not_from_task_0(params, tmp_path, features_dir, invoke, start_weights):
    stage(invoke, "train-fusion", params, tmp_path, features_dir)
    params["train"]["hash"]["init"] = "scratch"
    stage(invoke, "train-hash", params, tmp_path, features_dir, "--fusion", tmp_path / "fusion.pt")
    task_0 = fusion_weights(tmp_path / "fusion.pt")
    fresh = fresh_fusion(params)
    assert start_weights.keys() == task_0.keys() == fresh.keys()
    for name, tensor in start_weights.items():
        assert torch.equal(tensor, fresh[name]), name
        assert not torch.equal(tensor, task_0[name]), name  # task 0 trained every weight away from that start


@pytest.mark.parametrize("checkpoint", ["absent", "garbage"])
def test_scratch_never_reads_the_fusion_checkpoint(params, tmp_path, features_dir, invoke, start_weights, checkpoint):
    fusion = tmp_path / "fusion.pt"
    if checkpoint == "garbage":
        fusion.write_bytes(b"not a checkpoint")
    params["train"]["hash"]["init"] = "scratch"
    stage(invoke, "train-hash", params, tmp_path, features_dir, "--fusion", fusion)
    assert (tmp_path / "hash" / "16" / "model.pt").is_file()
    for name, tensor in fresh_fusion(params).items():
        assert torch.equal(start_weights[name], tensor), name


def test_fusion_init_starts_from_the_task_0_checkpoint(params, tmp_path, features_dir, invoke, start_weights):
    assert parse_params(params).train.hash.init == "fusion"  # the default
    stage(invoke, "train-fusion", params, tmp_path, features_dir)
    stage(invoke, "train-hash", params, tmp_path, features_dir, "--fusion", tmp_path / "fusion.pt")
    task_0 = fusion_weights(tmp_path / "fusion.pt")
    assert start_weights.keys() == task_0.keys()
    for name, tensor in task_0.items():
        assert torch.equal(start_weights[name], tensor), name


def test_fusion_init_still_needs_the_checkpoint(params, tmp_path, features_dir, invoke, one_line_error):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = invoke("train-hash", "--params", tmp_path / "params.yaml", "--features-dir", features_dir, "--fusion", tmp_path / "absent.pt",
                    "--out-dir", tmp_path / "hash", "--metrics-dir", tmp_path / "metrics", "--checkpoints", tmp_path / "checkpoints")
    assert "checkpoint not found" in one_line_error(result)


def test_an_unknown_init_is_refused_naming_the_key(params):
    params["train"]["hash"]["init"] = "task0"
    with pytest.raises(ConfigError, match=r"train.hash.init = 'task0': input should be 'fusion' or 'scratch'"):
        parse_params(params)
