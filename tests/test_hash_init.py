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


# ------------------------------------------------------------------ hash_head.init: cca_itq


def test_a_head_started_from_cca_itq_makes_exactly_its_codes():
    """start_from: the linear path is the baseline's hash and the MLP adds nothing, so the head's
    codes are CCA-ITQ's own, for every row and both modalities (strict protocol)."""
    import numpy as np

    from cmhash.baselines.methods import CcaItq, unit_rows
    from cmhash.models import encode, to_codes
    from conftest import synthetic, tiny_params

    p = tiny_params()
    p["hash_head"]["init"] = "cca_itq"
    model = CrossModalHasher(model_config(p, bits=8))
    train, other = synthetic(64, seed=1), synthetic(32, seed=5)
    fitted = CcaItq.fit(unit_rows(train["image"]), unit_rows(train["text"]), 8, seed=0, ridge=1e-2, n_iter=10)
    for head, mean, projection in ((model.image_head, fitted.image_mean, fitted.image_projection),
                                   (model.text_head, fitted.text_mean, fitted.text_projection)):
        head.start_from(torch.from_numpy(mean).float(), torch.from_numpy(projection).float())
    image, text = torch.from_numpy(other["image"]), torch.from_numpy(other["text"])
    image_out, text_out = encode(model, image, text, "strict")
    assert np.array_equal(to_codes(image_out).numpy(), fitted.image_codes(unit_rows(other["image"])))
    assert np.array_equal(to_codes(text_out).numpy(), fitted.text_codes(unit_rows(other["text"])))


def test_cca_itq_init_reads_the_baselines_stage_and_needs_it(params, tmp_path, features_dir, invoke, one_line_error, monkeypatch):
    """train-hash starts both heads' linear paths from stages/baselines/cca_itq/<bits>.npz; without
    that file it is one line naming it, and nothing is written."""
    import numpy as np

    params["hash_head"]["init"] = "cca_itq"
    params["train"]["hash"]["init"] = "scratch"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", tmp_path / "params.yaml", "--features-dir", features_dir, "--out-dir", tmp_path / "hash", "--bits", 16,
            "--metrics-dir", tmp_path / "metrics", "--checkpoints", tmp_path / "checkpoints", "--baselines-dir", tmp_path / "baselines"]
    assert "baselines/cca_itq/16.npz not found" in one_line_error(invoke("train-hash", *args))
    assert not (tmp_path / "hash").exists()

    rng = np.random.default_rng(0)
    saved = {"image_mean": rng.standard_normal(16), "image_projection": rng.standard_normal((16, 16)),
             "text_mean": rng.standard_normal(16), "text_projection": rng.standard_normal((16, 16))}
    (tmp_path / "baselines" / "cca_itq").mkdir(parents=True)
    np.savez(tmp_path / "baselines" / "cca_itq" / "16.npz", **saved)
    seen = {}
    fit = task_module.fit

    def spy(state, *a, **kw):
        seen.update(copy.deepcopy(state.runner.model.state_dict()))
        return fit(state, *a, **kw)

    monkeypatch.setattr(task_module, "fit", spy)
    result = invoke("train-hash", *args)
    assert result.exit_code == 0, result.output
    for side in ("image", "text"):
        projection = torch.from_numpy(saved[f"{side}_projection"]).float()
        assert torch.allclose(seen[f"{side}_head.linear.weight"], projection.T)
        assert torch.allclose(seen[f"{side}_head.linear.bias"], -(torch.from_numpy(saved[f"{side}_mean"]).float() @ projection))
        assert not seen[f"{side}_head.net.3.weight"].any()  # the MLP's output starts at zero
