"""Extraction on real-world trouble: interruption and resume (shards), stale shards, bad images,
precision settings, metadata, and CLIP weights that are a tag, a local file, or none."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image

from cmhash.config.schema import parse_params
from cmhash.config.stages import ExtractSettings, PrepareSettings
from cmhash.data.manifest import SPLITS, read_split, write_split
from cmhash.errors import ConfigError, DataError
from cmhash.features.clip import load_clip, load_seeded_clip
from cmhash.io import load_pickle
from cmhash.pipeline import extract, prepare
from cmhash.runtime.precision import inference_precision
from cmhash.runtime.seeding import seed_everything

# N demo pairs, SHARD per shard (4 shards: 3 x 12 + 4), BATCH per batch (2 batches per full shard)
N, SHARD, BATCH = 40, 12, 6


class Killed(RuntimeError):
    """Stands in for the process being killed mid-extraction."""


@pytest.fixture
def setup(params, tmp_path):
    params["data"]["demo"].update(n_items=N, query=8, train=20, val=8)
    params["clip"].update(shard_size=SHARD, batch_size=BATCH)
    p = parse_params(params)
    prepare.run(PrepareSettings.of(p), tmp_path / "prepare")
    return params, tmp_path


def run_extract(params, tmp_path, monkeypatch, out="extract", kill_after_batches=None) -> list[int]:
    """Run the stage into tmp_path/<out>; returns the size of every image batch CLIP encoded.
    With kill_after_batches=k the k+1-th batch raises `Killed`, as a crash would."""
    encoded: list[int] = []

    def counting_load_clip(*args, **kwargs):
        clip = load_seeded_clip(*args, **kwargs)
        encode_image = clip.model.encode_image

        def counted(images):
            if kill_after_batches is not None and len(encoded) == kill_after_batches:
                raise Killed
            encoded.append(len(images))
            return encode_image(images)

        clip.model.encode_image = counted
        return clip

    monkeypatch.setattr("cmhash.features.clip.load_seeded_clip", counting_load_clip)  # extract imports it when it runs
    p = parse_params(params)
    extract.run(ExtractSettings.of(p), tmp_path / "prepare", tmp_path / out, tmp_path / f"{out}.json")
    return encoded


def interrupted(params, tmp_path, monkeypatch, out="extract", shards_done=2) -> list[int]:
    with pytest.raises(Killed):
        run_extract(params, tmp_path, monkeypatch, out, kill_after_batches=shards_done * SHARD // BATCH)
    return sorted(p.name for p in (tmp_path / f"{out}_shards").iterdir())


def features(folder: Path) -> dict[str, dict]:
    return {split: load_pickle(folder / f"{split}.pkl") for split in SPLITS}


def assert_same_features(a: Path, b: Path) -> None:
    fa, fb = features(a), features(b)
    for split in SPLITS:
        assert fa[split]["ids"] == fb[split]["ids"]
        for key in ("image", "text", "label"):
            np.testing.assert_array_equal(fa[split][key], fb[split][key], err_msg=f"{split} {key}")
    assert (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text()


def test_interrupted_extraction_resumes_without_redoing_finished_shards(setup, monkeypatch):
    params, tmp = setup
    assert sum(run_extract(params, tmp, monkeypatch, out="reference")) == N  # uninterrupted, for comparison
    assert not (tmp / "reference_shards").exists()  # work folder removed after success

    assert len(interrupted(params, tmp, monkeypatch)) == 2  # two shards saved before the "crash"
    assert not (tmp / "extract" / "train.pkl").exists()
    resumed = run_extract(params, tmp, monkeypatch)
    assert sum(resumed) == N - 2 * SHARD  # only the unfinished shards are encoded again
    assert_same_features(tmp / "extract", tmp / "reference")
    assert not (tmp / "extract_shards").exists()


def test_a_second_interruption_keeps_what_both_runs_finished(setup, monkeypatch):
    params, tmp = setup
    interrupted(params, tmp, monkeypatch, shards_done=1)
    assert len(interrupted(params, tmp, monkeypatch, shards_done=2)) == 3
    assert sum(run_extract(params, tmp, monkeypatch)) == N - 3 * SHARD


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 7},  # other random-init weights
        {"clip": {"model": "cmhash-demo"}},
        {"clip": {"precision": "bf16"}},
    ],
    ids=["seed", "model", "precision"],
)
def test_shards_made_with_other_settings_are_not_reused(setup, monkeypatch, change):
    params, tmp = setup
    interrupted(params, tmp, monkeypatch)
    for key, value in change.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    assert sum(run_extract(params, tmp, monkeypatch)) == N  # nothing reused
    run_extract(params, tmp, monkeypatch, out="reference")
    assert_same_features(tmp / "extract", tmp / "reference")


def test_a_changed_caption_invalidates_only_its_shard(setup, monkeypatch):
    params, tmp = setup
    interrupted(params, tmp, monkeypatch)
    first = read_split(tmp / "prepare" / "train.jsonl")[0]  # the very first pair: shard 0
    for split in SPLITS:
        path = tmp / "prepare" / f"{split}.jsonl"
        items = read_split(path)
        write_split(path, [it if it.id != first.id else type(it)(it.id, it.image, "a brand new caption", it.labels) for it in items])
    assert sum(run_extract(params, tmp, monkeypatch)) == N - SHARD  # shard 1 reused, shard 0 redone
    run_extract(params, tmp, monkeypatch, out="reference")
    assert_same_features(tmp / "extract", tmp / "reference")


def test_undecodable_images_of_a_finished_shard_stay_skipped_after_resume(setup, monkeypatch):
    params, tmp = setup
    order = list({it.id: it for s in SPLITS for it in read_split(tmp / "prepare" / f"{s}.jsonl")}.values())
    broken = order[3]  # in shard 0, which the interrupted run finishes
    Path(broken.image).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    interrupted(params, tmp, monkeypatch)
    assert sum(run_extract(params, tmp, monkeypatch)) == N - 2 * SHARD  # the broken file is not read again
    skipped = [json.loads(line) for line in (tmp / "extract" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [broken.id] and "unreadable image" in skipped[0]["reason"]
    assert all(broken.id not in f["ids"] for f in features(tmp / "extract").values())
    run_extract(params, tmp, monkeypatch, out="reference")
    assert_same_features(tmp / "extract", tmp / "reference")


def test_feature_files_and_metrics_record_what_made_them(setup, monkeypatch):
    params, tmp = setup
    run_extract(params, tmp, monkeypatch)
    train = load_pickle(tmp / "extract" / "train.pkl")
    assert train["image"].dtype == np.float32 and train["text"].dtype == np.float32
    assert train["clip_model"] == "cmhash-tiny" and train["pretrained"] == "none" and train["random_init"] is True
    assert train["seed"] == params["seed"] and len(train["weights_sha256"]) == 64
    assert train["precision"] == "fp32"  # auto on CPU
    assert "Resize" in train["preprocess"] or "Compose" in train["preprocess"]
    assert train["dataset"] == "demo" and train["dataset_seed"] == params["seed"]
    assert train["dataset_options"]["n_items"] == N and len(train["dataset_version"]) == 16
    metrics = json.loads((tmp / "extract.json").read_text())
    assert metrics["random_init"] is True and "RANDOM" in metrics["weights"] and metrics["precision"] == "fp32"
    assert metrics["dataset_version"] == train["dataset_version"]

    # the dataset version follows the manifests' content
    path = tmp / "prepare" / "val.jsonl"
    items = read_split(path)
    write_split(path, items[:-1])
    run_extract(params, tmp, monkeypatch, out="other")
    assert load_pickle(tmp / "other" / "train.pkl")["dataset_version"] != train["dataset_version"]
    write_split(path, items)
    run_extract(params, tmp, monkeypatch, out="same")
    assert load_pickle(tmp / "same" / "train.pkl")["dataset_version"] == train["dataset_version"]


def test_decoding_workers_give_the_same_features_as_the_main_process(setup, monkeypatch):
    params, tmp = setup
    params["clip"]["num_workers"] = 0
    run_extract(params, tmp, monkeypatch, out="inline")
    params["clip"]["num_workers"] = 2
    assert run_extract(params, tmp, monkeypatch, out="workers") == [BATCH, BATCH] * 3 + [4]  # batches, in order
    assert_same_features(tmp / "workers", tmp / "inline")


def test_bf16_runs_clip_under_autocast_and_saves_float32(setup, monkeypatch):
    params, tmp = setup
    run_extract(params, tmp, monkeypatch, out="fp32")
    params["clip"]["precision"] = "bf16"
    run_extract(params, tmp, monkeypatch, out="bf16")
    fp32, bf16 = features(tmp / "fp32"), features(tmp / "bf16")
    assert bf16["train"]["precision"] == "bf16" and bf16["train"]["image"].dtype == np.float32
    for key in ("image", "text"):
        a, b = fp32["train"][key], bf16["train"][key]
        assert not np.array_equal(a, b)  # the arithmetic did change (bf16 keeps 8 bits of mantissa)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.99, key  # but the features are the same features


def test_fail_policy_stops_on_a_bad_image_with_one_line(setup, monkeypatch):
    params, tmp = setup
    params["data"]["on_bad_item"] = "fail"
    broken = read_split(tmp / "prepare" / "query.jsonl")[0]
    Path(broken.image).write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"bad image {broken.id}: unreadable image.*on_bad_item: skip"):
        run_extract(params, tmp, monkeypatch)


# --- precision -------------------------------------------------------------------------------


def test_precision_auto_and_explicit():
    assert inference_precision("auto", torch.device("cpu")).name == "fp32"
    assert inference_precision("bf16", torch.device("cpu")).name == "bf16"
    with pytest.raises(ConfigError, match="clip.precision: .*fp16 needs a CUDA device"):
        inference_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"clip.precision = 'half': input should be 'auto', 'fp32', 'bf16' or 'fp16'$"):
        parse_params({"clip": {"precision": "half"}})


@pytest.mark.cuda
def test_precision_auto_is_fp16_on_cuda():
    assert inference_precision("auto", torch.device("cuda")).name == "fp16"


def test_fp16_on_cpu_is_one_line_from_the_cli(params, params_file, invoke, one_line_error):
    assert invoke("prepare", "--params", params_file).exit_code == 0
    params["clip"]["precision"] = "fp16"
    params_file.write_text(yaml.safe_dump(params))
    assert "fp16 needs a CUDA device" in one_line_error(invoke("extract", "--params", params_file))


# --- bad images and captions, end to end -----------------------------------------------------


def _jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path, format="JPEG")


def test_corrupt_jpeg_and_empty_caption_are_skipped_and_reported(params, params_file, tmp_path, invoke):
    root = tmp_path / "collection"
    rows = []
    for n in range(12):
        _jpeg(root / f"img/{n}.jpg", (20 * n, 255 - 20 * n, 128))
        rows.append({"id": f"p{n}", "image": f"img/{n}.jpg", "caption": f"photo number {n}", "labels": ["a" if n % 2 else "b"]})
    good = (root / "img/5.jpg").read_bytes()
    (root / "img/5.jpg").write_bytes(good[: len(good) // 2])  # truncated download
    rows[7]["caption"] = "  "
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params["data"].update(name="manifest", root=str(root))
    params["data"]["manifest"] = {"path": "pairs.jsonl", "query": 3, "train": 5, "val": 2}
    params["clip"]["batch_size"] = 4  # a few batches, so the progress bar has a rate to show
    params_file.write_text(yaml.safe_dump(params))

    output = {}
    for stage in ("prepare", "extract"):
        result = invoke(stage, "--params", params_file)
        assert result.exit_code == 0, result.output
        output[stage] = " ".join(result.output.split())  # log lines wrap at the terminal width
    assert "skipped 1 item(s) (1 empty caption)" in output["prepare"]
    assert "skipped 1 undecodable image(s)" in output["extract"]
    assert re.search(r"extract \S* 11/11 100% [\d,]+ pair/s", output["extract"]), output["extract"]  # the bar's rate
    stages = tmp_path / "stages"
    prepare_skipped = [json.loads(line) for line in (stages / "prepare/skipped.jsonl").read_text().splitlines()]
    extract_skipped = [json.loads(line) for line in (stages / "extract/skipped.jsonl").read_text().splitlines()]
    assert prepare_skipped == [{"id": "p7", "reason": "empty caption"}]
    assert [s["id"] for s in extract_skipped] == ["p5"] and "truncated" in extract_skipped[0]["reason"].lower()
    kept = [i for split in ("query", "retrieval") for i in load_pickle(stages / f"extract/{split}.pkl")["ids"]]
    assert sorted(kept) == sorted(f"p{n}" for n in range(12) if n not in (5, 7))
    assert json.loads((tmp_path / "metrics/extract.json").read_text())["skipped_images"] == 1

    params["data"]["on_bad_item"] = "fail"
    params_file.write_text(yaml.safe_dump(params))
    result = invoke("extract", "--params", params_file)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]  # after the random-weights warning
    assert line.startswith("error: bad image p5: unreadable image")
    assert line.endswith("(or set data.on_bad_item: skip to leave such pairs out)")


# --- CLIP weights: tag, local file, none ------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        # what open_clip 3.3 raises when the Hugging Face download fails (seen offline)
        RuntimeError("Failed to download weights for tag 'openai': Failed to download file (open_clip_pytorch_model.bin) "
                     "for timm/vit_base_patch32_clip_224.openai. Last error: An error happened while trying to locate the file"),
        LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot find the requested files "
                                "in the local cache."),
        OSError("[Errno -2] Name or service not known"),
    ],
    ids=["open_clip", "huggingface_hub", "network"],
)
def test_a_tag_that_cannot_be_downloaded_is_one_line(params, params_file, monkeypatch, capfd, invoke, one_line_error, error):
    assert invoke("prepare", "--params", params_file).exit_code == 0

    def failed_download(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.error("Failed to download weights for tag 'openai'")  # open_clip logs on the root logger
        raise error

    monkeypatch.setattr(open_clip, "create_model_and_transforms", failed_download)
    params["clip"].update(model="ViT-B-32", pretrained="openai")
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("extract", "--params", params_file))
    assert "cannot fetch CLIP weights 'openai'" in line and "local file" in line and "none" in line
    assert "Retrying" not in capfd.readouterr().err  # huggingface_hub's own stderr handler was held back too


def test_a_local_checkpoint_file_gives_the_same_features_as_its_weights(setup, monkeypatch):
    params, tmp = setup
    run_extract(params, tmp, monkeypatch, out="random")  # random init from params' seed
    seed_everything(params["seed"])
    weights = tmp / "tiny.pt"
    torch.save(load_clip("cmhash-tiny", "none", torch.device("cpu")).model.state_dict(), weights)

    params["clip"]["pretrained"] = str(weights)
    run_extract(params, tmp, monkeypatch, out="file")
    assert_same_features(tmp / "file", tmp / "random")
    train = load_pickle(tmp / "file" / "train.pkl")
    assert train["random_init"] is False and train["pretrained"] == str(weights)
    assert train["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert "seed" not in train and "weights_sha256" not in train
    metrics = json.loads((tmp / "file.json").read_text())
    assert metrics["random_init"] is False and train["checkpoint_sha256"] in metrics["weights"]


@pytest.mark.parametrize("content", ["code", "garbage"])
def test_a_checkpoint_that_is_not_plain_weights_is_refused_without_running_it(params, params_file, tmp_path, invoke, one_line_error,
                                                                               content):
    assert invoke("prepare", "--params", params_file).exit_code == 0
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "weights.pt"
    if content == "code":
        class RunsCode:
            def __reduce__(self):
                return os.mkdir, (str(marker),)

        torch.save({"state_dict": RunsCode()}, checkpoint)
    else:
        checkpoint.write_bytes(b"<html>404 not found</html>")
    params["clip"]["pretrained"] = str(checkpoint)
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("extract", "--params", params_file))
    if content == "code":  # the wording every loader uses: the file, the refused global, not executed
        assert f"refused to load {checkpoint}: it holds a reference to posix.mkdir, which was not executed" in line
    else:
        assert f"cannot load {checkpoint}: not a torch checkpoint" in line
    assert "weights_only" not in line  # never suggests turning the check off
    assert not marker.exists()  # weights_only=True: the pickled call was never made
