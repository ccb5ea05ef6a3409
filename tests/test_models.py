import os

import pytest
import torch
import torch.nn.functional as F

from cmhash.config.choices.archs import HashHeadConfig
from cmhash.errors import ConfigError, DataError
from cmhash.models import CrossModalHasher, ModelConfig, encode, load_checkpoint, save_checkpoint, to_codes

D = 16
KNOBS = {
    "reference": {"d_model": None, "nhead": 2, "num_layers": 2, "dim_feedforward": 64, "dropout": 0.1},
    "cross_attention": {"d_model": None, "nhead": 2, "num_layers": 2, "dim_feedforward": 64, "dropout": 0.1, "attention_dropout": 0.1},
}


def make_model(bits=32, arch="reference", **knobs):
    torch.manual_seed(0)
    head = HashHeadConfig(hidden=64, dropout=0.3) if bits else None
    return CrossModalHasher(ModelConfig(arch=arch, knobs={**KNOBS[arch], **knobs}, feature_dim=D, bits=bits, hash_head=head))


def features(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


ARCHS = ["reference", "cross_attention"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("protocol", ["strict", "paired"])
def test_an_items_code_does_not_depend_on_its_batch_mates(protocol, arch):
    """Reference flaw 2: its encoder let items of one batch attend to each other."""
    model = make_model(arch=arch)
    image, text = features(50)
    in_batch = encode(model, image, text, protocol)
    for i in (0, 17, 49):
        alone = encode(model, image[i : i + 1], text[i : i + 1], protocol)
        for a, b in zip(alone, in_batch):
            torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-6)
            assert torch.equal(to_codes(a[0]), to_codes(b[i]))


@pytest.mark.parametrize("arch", ARCHS)
def test_strict_image_code_ignores_the_text_and_paired_does_not(arch):
    """Reference flaw 1: a real image query has no caption."""
    model = make_model(arch=arch)
    image, text = features(8)
    _, other_text = features(8, seed=2)
    strict_image, strict_text = encode(model, image, text, "strict")
    assert torch.equal(encode(model, image, other_text, "strict")[0], strict_image)
    assert torch.equal(encode(model, image * 0 + 1, text, "strict")[1], strict_text)
    assert not torch.allclose(encode(model, image, other_text, "paired")[0], encode(model, image, text, "paired")[0])


def test_cross_attention_masks_an_absent_modality_item_by_item():
    """An item with no caption in a batch of full pairs gets what it gets alone with no caption,
    and its image embedding owes nothing to the text encoder (no learned stand-in for the text)."""
    model = make_model(arch="cross_attention").eval()
    image, text = features(10)
    text[3] = 0
    with torch.no_grad():
        mixed_image, mixed_text = model.fusion(F.normalize(image, dim=1), F.normalize(text, dim=1))
        alone_image, _ = model.fusion(F.normalize(image[3:4], dim=1), text[3:4])
        torch.testing.assert_close(mixed_image[3], alone_image[0], rtol=1e-5, atol=1e-6)
        strict_image = encode(model, image, text, "strict")[0]
        for p in model.fusion.text_encoder.parameters():
            p.add_(torch.randn_like(p))
        torch.testing.assert_close(encode(model, image, text, "strict")[0], strict_image)
        assert not torch.allclose(model.fusion(F.normalize(image, dim=1), F.normalize(text, dim=1))[0][0], mixed_image[0])
    assert not torch.isnan(model.fusion(torch.zeros(2, D), torch.zeros(2, D))[0]).any()  # nothing at all: no NaN


def test_cross_attention_rejects_a_width_the_heads_do_not_divide():
    with pytest.raises(ConfigError, match=r"model\.cross_attention\b.*d_model\W+20 .*divisible by nhead\W+4"):
        make_model(bits=None, arch="cross_attention", d_model=20, nhead=4)  # width 10: 4 heads do not divide it
    make_model(bits=None, arch="cross_attention", d_model=20, nhead=5)


def test_reference_rejects_a_width_the_heads_do_not_divide():
    with pytest.raises(ConfigError, match=r"model\.reference\b.*d_model\W+20 .*divisible by nhead\W+3"):
        make_model(bits=None, d_model=20, nhead=3)
    assert make_model(bits=None, d_model=20, nhead=4).fusion.embed_dim == 10


def test_a_hash_model_needs_its_hash_head_settings():
    with pytest.raises(ConfigError, match="hash_head"):
        CrossModalHasher(ModelConfig(arch="reference", knobs=KNOBS["reference"], feature_dim=D, bits=16))


def test_arch_knobs_are_checked_against_the_arch():
    with pytest.raises(ValueError, match="attention_dropout"):  # a cross_attention knob given to reference
        make_model(bits=None, attention_dropout=0.1)
    with pytest.raises(ConfigError, match="unknown fusion architecture 'mlp'"):
        CrossModalHasher(ModelConfig(arch="mlp", knobs={}, feature_dim=D))


def test_every_item_is_encoded():
    """Reference flaw 3: drop_last silently dropped query/database items."""
    model = make_model()
    image, text = features(1001)
    out_image, out_text = encode(model, image, text, "strict", batch_size=256)
    assert len(out_image) == len(out_text) == 1001


def test_hash_outputs_are_unit_norm_tanh_and_codes_are_pm1():
    model = make_model(bits=16)
    out_image, out_text = encode(model, *features(20), "strict")
    assert out_image.shape == (20, 16)
    torch.testing.assert_close(out_image.norm(dim=1), torch.ones(20))
    assert out_image.abs().max() <= 1
    assert set(to_codes(out_image).unique().tolist()) <= {-1, 1}
    assert to_codes(torch.tensor([0.0, -0.0, -1e-9])).tolist() == [1, 1, -1]


def test_task0_model_returns_embeddings_of_half_d_model():
    model = make_model(bits=None)
    out_image, _ = encode(model, *features(5), "paired")
    assert out_image.shape == (5, D)  # d_model = 2 * D, split into halves


def test_checkpoint_round_trip_keeps_config_and_outputs(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "m.pt", model, epoch=3)
    back, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["epoch"] == 3 and back.config == model.config
    assert type(ckpt["config"]) is dict and ckpt["config"] == model.config.model_dump()  # plain data: weights_only loads it
    assert ckpt["config"]["hash_head"] == {"hidden": 64, "dropout": 0.3, "init": "cca_itq"}  # the default: a linear path too
    for a, b in zip(encode(model, *features(4), "strict"), encode(back, *features(4), "strict")):
        assert torch.equal(a, b)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"config": {}, "state_dict": {}, "evil": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="refused to load .*evil.pt: it holds a reference to posix.system, which was not executed"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_checkpoint_of_another_layout_is_one_line_naming_it(tmp_path):
    model = make_model(bits=16)
    old_config = {"model": {"arch": "reference", "hash_hidden": 64}, "feature_dim": D, "bits": 16}  # the layout before model.<arch>
    torch.save({"config": old_config, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(DataError, match="old.pt does not match this version's models") as err:
        load_checkpoint(tmp_path / "old.pt")
    assert "\n" not in str(err.value)
    torch.save({"weights": model.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not a cmhash model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
