"""Each command through Typer's CliRunner, and the one-line errors a user can cause."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from cmhash.cli import STAGES, app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_app_and_every_command_have_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in STAGES:
        assert name in result.output
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and "--params" in sub.output


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_params_file(tmp_path):
    assert "params file not found" in one_line_error(invoke("prepare", "--params", tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (("data", "name"), "imagenet", "unknown dataset 'imagenet'; choose one of: coco, demo, manifest, mirflickr, nuswide"),
        (("data", "on_bad_item"), "ignore", "unknown data.on_bad_item 'ignore'; choose one of: fail, skip"),
    ],
)
def test_bad_prepare_settings(params, params_file, key, value, message):
    params[key[0]][key[1]] = value
    params_file.write_text(yaml.safe_dump(params))
    assert message in one_line_error(invoke("prepare", "--params", params_file))
    assert not (params_file.parent / "stages").exists() or not any((params_file.parent / "stages").rglob("*.jsonl"))


def test_extract_before_prepare_says_what_to_run(params_file):
    assert "run `cmhash prepare` first" in one_line_error(invoke("extract", "--params", params_file))


def test_training_without_features_says_what_is_missing(params_file):
    assert "file not found" in one_line_error(invoke("train-fusion", "--params", params_file))


def test_unknown_loss_lists_the_valid_ones(params, params_file, tmp_path):
    _prepare_and_extract(params_file)
    params["loss"] = "hinge"
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("train-fusion", "--params", params_file))
    assert "unknown loss 'hinge'" in line and "contrastive" in line and "infonce" in line


def test_cuda_requested_but_absent(params, params_file, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _prepare_and_extract(params_file)
    params["device"] = "cuda"
    params_file.write_text(yaml.safe_dump(params))
    assert "CUDA is not available" in one_line_error(invoke("train-fusion", "--params", params_file))


def test_nan_features_are_refused(params_file):
    import numpy as np

    from cmhash.io import load_pickle, save_pickle

    _prepare_and_extract(params_file)
    path = params_file.parent / "stages/extract/train.pkl"
    data = load_pickle(path)
    data["image"][3, 0] = np.nan
    save_pickle(path, data)
    assert "NaN" in one_line_error(invoke("train-fusion", "--params", params_file))


def _prepare_and_extract(params_file):
    for stage in ("prepare", "extract"):
        result = invoke(stage, "--params", params_file)
        assert result.exit_code == 0, result.output
    assert json.loads((params_file.parent / "metrics/extract.json").read_text())["random_init"] is True
