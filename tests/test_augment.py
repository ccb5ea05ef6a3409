"""train.augment: feature noise and feature dropout on train batches only, seeded, off by default."""

from __future__ import annotations

import pytest
import torch

from cmhash.config.schema import AugmentConfig, parse_params
from cmhash.errors import ConfigError
from cmhash.runtime.distributed import World
from cmhash.training.augment import FeatureAugment
from cmhash.training.runner import Runner
from test_training import train


def batch(seed: int = 0, rows: int = 64, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)


def test_off_by_default_returns_the_batch_and_draws_nothing():
    assert parse_params({}).train.augment == AugmentConfig() and not AugmentConfig().on
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    image, text = batch()
    out = FeatureAugment(AugmentConfig(), g)(image, text)
    assert out[0] is image and out[1] is text
    assert torch.equal(g.get_state(), before)  # the batch order of an off run is untouched


def test_noise_adds_gaussian_noise_of_the_given_std():
    image, text = batch(rows=4000, dim=64)
    out_image, out_text = FeatureAugment(AugmentConfig(noise_std=0.2), torch.Generator().manual_seed(1))(image, text)
    for before, after in ((image, out_image), (text, out_text)):
        noise = after - before
        assert abs(noise.mean().item()) < 0.002  # 256k draws: the mean's std is 0.2 / 506
        assert noise.std().item() == pytest.approx(0.2, rel=0.01)
    assert not torch.allclose(out_image - image, out_text - text)  # each modality its own noise


def test_dropout_zeroes_a_fraction_p_and_scales_the_rest():
    image, text = batch(rows=4000, dim=64)
    out, _ = FeatureAugment(AugmentConfig(dropout=0.25), torch.Generator().manual_seed(1))(image, text)
    zeroed = out == 0
    assert zeroed.float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert torch.allclose(out[~zeroed], image[~zeroed] / 0.75)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    cfg = AugmentConfig(noise_std=0.1, dropout=0.1)
    image, text = batch()
    runs = [FeatureAugment(cfg, torch.Generator().manual_seed(seed))(image, text) for seed in (3, 3, 4)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_the_ranks_shares_together_are_the_one_process_batch():
    cfg = AugmentConfig(noise_std=0.1, dropout=0.2)
    image, text = batch(rows=8)
    whole = FeatureAugment(cfg, torch.Generator().manual_seed(9))(image, text)
    shares = [FeatureAugment(cfg, torch.Generator().manual_seed(9), World(rank=r, local_rank=r, size=2))(image[4 * r:4 * r + 4],
                                                                                                        text[4 * r:4 * r + 4])
              for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shares]), whole[0]) and torch.equal(torch.cat([s[1] for s in shares]), whole[1])


@pytest.mark.parametrize(("key", "value"), [("noise_std", -0.1), ("dropout", 1.0), ("dropout", -0.1), ("noise_std", "lots"), ("p", 0.1)])
def test_a_bad_augment_knob_is_refused_in_one_line_naming_it(key, value):
    with pytest.raises(ConfigError) as err:
        parse_params({"train": {"augment": {key: value}}})
    assert f"train.augment.{key}" in str(err.value) and "\n" not in str(err.value)


def seen_batches(params, tmp_path, features_dir, monkeypatch) -> tuple[list, list]:
    """The (image, text) every train and every val step saw."""
    seen = {"train": [], "val": []}
    step = Runner.step

    def spy(self, image, text, local=False):
        seen["val" if local else "train"].append((image.clone(), text.clone()))
        return step(self, image, text, local=local)

    with monkeypatch.context() as patch:  # undone after this run: a second run's spy must not wrap this one
        patch.setattr(Runner, "step", spy)
        train(params, tmp_path, features_dir)
    return seen["train"], seen["val"]


def test_on_it_changes_the_train_batches_only(params, tmp_path, features_dir, monkeypatch):
    from cmhash.features.store import load_features

    features = {split: load_features(features_dir / f"{split}.pkl", torch.device("cpu")) for split in ("train", "val")}
    rows = {split: {tuple(r) for r in features[split].image.tolist()} for split in features}  # as training loads them
    plain_train, plain_val = seen_batches(params, tmp_path / "off", features_dir, monkeypatch)
    params["train"]["augment"].update(noise_std=0.05, dropout=0.1)
    aug_train, aug_val = seen_batches(params, tmp_path / "on", features_dir, monkeypatch)
    assert all(tuple(r) in rows["train"] for image, _ in plain_train for r in image.tolist())  # off: the features as they are
    assert not any(tuple(r) in rows["train"] for image, _ in aug_train for r in image.tolist())  # on: every train row changed
    assert len(aug_val) == len(plain_val)
    for (a_image, a_text), (p_image, p_text) in zip(aug_val, plain_val):
        assert torch.equal(a_image, p_image) and torch.equal(a_text, p_text)  # val: untouched
    assert all(tuple(r) in rows["val"] for image, _ in aug_val for r in image.tolist())
