"""Each command through Typer's CliRunner, and the one-line errors a user can cause."""

import pytest
import yaml

from cmhash.cli import STAGES


def test_app_and_every_command_have_help(invoke):
    result = invoke("--help")
    assert result.exit_code == 0
    for name in STAGES:
        assert name in result.output
        sub = invoke(name, "--help")
        assert sub.exit_code == 0 and "--params" in sub.output


def test_missing_params_file(tmp_path, invoke, one_line_error):
    assert "params file not found" in one_line_error(invoke("prepare", "--params", tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (("data", "name"), "imagenet",
         "data.name = 'imagenet': unknown dataset 'imagenet'; choose one of: coco, demo, features, manifest, mirflickr, nuswide, webdataset"),
        (("data", "on_bad_item"), "ignore", "data.on_bad_item = 'ignore': input should be 'skip' or 'fail'"),
    ],
)
def test_bad_prepare_settings(params, params_file, invoke, one_line_error, key, value, message):
    params[key[0]][key[1]] = value
    params_file.write_text(yaml.safe_dump(params))
    assert message in one_line_error(invoke("prepare", "--params", params_file))
    assert not (params_file.parent / "stages").exists() or not any((params_file.parent / "stages").rglob("*.jsonl"))


def test_extract_before_prepare_says_what_to_run(params_file, invoke, one_line_error):
    assert "run `cmhash prepare` first" in one_line_error(invoke("extract", "--params", params_file))


def test_training_without_features_says_what_is_missing(params_file, invoke, one_line_error):
    assert "file not found" in one_line_error(invoke("train-fusion", "--params", params_file))


def test_unknown_loss_lists_the_valid_ones(params, params_file, invoke, one_line_error):
    # Refused when params.yaml is read, before any stage's work: no features are needed.
    params["loss"] = "hinge"
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("train-fusion", "--params", params_file))
    assert "unknown loss 'hinge'" in line and "contrastive" in line and "infonce" in line


def test_cuda_requested_but_absent(params, params_file, invoke, one_line_error, prepare_and_extract, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    prepare_and_extract(params_file)
    params["device"] = "cuda"
    params_file.write_text(yaml.safe_dump(params))
    assert "CUDA is not available" in one_line_error(invoke("train-fusion", "--params", params_file))


def test_nan_features_are_refused(params_file, invoke, one_line_error, prepare_and_extract):
    import numpy as np

    from cmhash.io import load_pickle, save_pickle

    prepare_and_extract(params_file)
    path = params_file.parent / "stages/extract/train.pkl"
    data = load_pickle(path)
    data["image"][3, 0] = np.nan
    save_pickle(path, data)
    assert "NaN" in one_line_error(invoke("train-fusion", "--params", params_file))
