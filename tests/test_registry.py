"""The five registries of named choices (cmhash.config.choices): every entry is usable end to end - its
knobs build, its implementation imports, it is a valid params.yaml value and `cmhash list` shows
it - and an unknown name gets the one message format wherever it is met."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cmhash.config.choices.archs import ARCHS
from cmhash.config.choices.baselines import BASELINES
from cmhash.config.choices.datasets import DATASETS
from cmhash.config.choices.indexes import INDEXES
from cmhash.config.choices.losses import LOSSES
from cmhash.config.choices.optimizers import OPTIMIZERS
from cmhash.config.choices.schedules import SCHEDULES
from cmhash.config.registry import Registry
from cmhash.config.schema import Params, parse_params, section_at
from cmhash.errors import ConfigError
from conftest import with_value

REPO = Path(__file__).resolve().parents[1]
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

# `cmhash list <kind>` -> (registry, the params.yaml key that names an entry, the section holding
# one sub-section of knobs per entry, or None)
KINDS: dict[str, tuple[Registry, str, str | None]] = {
    "losses": (LOSSES, "loss", "losses"),
    "archs": (ARCHS, "model.arch", "model"),
    "schedules": (SCHEDULES, "train.schedule.name", "train.schedule"),
    "datasets": (DATASETS, "data.name", "data"),
    "optimizers": (OPTIMIZERS, "train.optimizer.name", "train.optimizer"),
    "baselines": (BASELINES, "baselines.methods", "baselines"),
    "indexes": (INDEXES, "search.index", "search"),
}
LISTS = {"baselines.methods"}  # keys that name entries in a list


def choosing(key: str, name: str) -> dict:
    """params.yaml with `name` chosen at `key` (alone in the list for a list-valued key)."""
    return with_value(COMMITTED, key, [name] if key in LISTS else name)


def shown(key: str) -> str:
    """How a message names the key of a chosen name (a list's first item is key[0])."""
    return f"{key}[0]" if key in LISTS else key


def entries(kind: str) -> list:
    return [pytest.param(entry, id=entry.name) for entry in KINDS[kind][0].entries()]


@pytest.mark.parametrize("kind", KINDS)
def test_names_are_sorted_and_not_empty(kind):
    """names() is non-empty, sorted, and the order entries() and len() use."""
    registry = KINDS[kind][0]
    names = registry.names()
    assert names and names == sorted(names) and all(names)
    assert [e.name for e in registry.entries()] == names and len(registry) == len(names)


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_builds_its_knobs_and_loads_its_implementation(kind):
    """Knobs all have defaults; "module:attribute" imports and names a callable; a summary line exists."""
    for entry in KINDS[kind][0].entries():
        entry.knobs()
        assert callable(entry.load()), entry.impl
        assert entry.summary and "\n" not in entry.summary, entry.name


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_is_a_valid_params_choice_with_its_own_section(kind):
    """Choosing any entry in params.yaml parses; `<section>.<name>` in the schema is the entry's
    knobs class, and params.yaml holds that section."""
    registry, key, section = KINDS[kind]
    for name in registry.names():
        p = parse_params(choosing(key, name))
        assert isinstance(p, Params)
        if section is not None:
            loc = (*section.split("."), name)
            assert section_at(loc) is registry.entry(name).knobs
            node = COMMITTED
            for part in loc:
                node = node[part]
            assert isinstance(node, dict)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_name_message(kind):
    """One format everywhere: "unknown <kind> 'nope'; choose one of: a, b, ..." from
    `Registry.entry`, and on the params.yaml line that names the key."""
    registry, key, _ = KINDS[kind]
    expected = f"unknown {registry.kind} 'nope'; choose one of: {', '.join(registry.names())}"
    with pytest.raises(ConfigError) as err:
        registry.entry("nope")
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        parse_params(choosing(key, "nope"), where="params.yaml")
    assert str(err.value) == f"params.yaml: {shown(key)} = 'nope': {expected}"


@pytest.mark.parametrize("kind", KINDS)
def test_cmhash_list_prints_every_name(kind):
    """`cmhash list <kind>` exits 0 with one row per name, the name whole at the row's start."""
    from cmhash.cli import app

    result = CliRunner().invoke(app, ["list", kind])
    assert result.exit_code == 0, result.output
    for name in KINDS[kind][0].names():
        assert re.search(rf"^\s*{re.escape(name)}\s", result.output, re.MULTILINE), f"{name} not listed whole:\n{result.output}"


def test_cmhash_list_unknown_kind_is_one_error_line():
    """`cmhash list nope`: exit code 1 and the unknown-name line listing the kinds."""
    from cmhash.cli import app

    result = CliRunner().invoke(app, ["list", "nope"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert lines == [f"error: unknown list 'nope'; choose one of: {', '.join(KINDS)}"]


# ------------------------------------------------------------------ each entry's implementation works


@pytest.mark.parametrize("entry", entries("losses"))
def test_each_loss_builds_from_default_knobs_and_gives_a_finite_scalar(entry):
    from cmhash.losses import build_loss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    y = torch.randn(8, 16, generator=gen)
    loss = build_loss(entry.name, entry.knobs())
    value = loss(x, y)
    assert value.ndim == 0 and math.isfinite(value.item())
    value.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("entry", entries("archs"))
def test_each_arch_builds_a_hasher_from_default_knobs_and_encodes(entry):
    """Default knobs (nhead 4 divides 2 x feature_dim 16), hash heads at 16 bits: finite outputs of
    the right shape under both protocols, and codes of +-1."""
    from cmhash.config.choices.archs import HashHeadConfig
    from cmhash.models import PROTOCOLS, CrossModalHasher, ModelConfig, encode, to_codes

    torch.manual_seed(0)
    config = ModelConfig(arch=entry.name, knobs=entry.knobs().model_dump(), feature_dim=16, bits=16, hash_head=HashHeadConfig(hidden=32))
    model = CrossModalHasher(config)
    image, text = torch.randn(8, 16), torch.randn(8, 16)
    for protocol in PROTOCOLS:
        out_image, out_text = encode(model, image, text, protocol)
        assert out_image.shape == out_text.shape == (8, 16)
        assert torch.isfinite(out_image).all() and torch.isfinite(out_text).all()
        assert set(to_codes(out_image).unique().tolist()) <= {-1, 1}


@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("entry", entries("schedules"))
def test_each_schedule_builds_on_a_toy_optimizer(entry, warmup):
    """Default knobs over 30 epochs: every lr finite and in (0, base]; with a warm-up, it starts
    at warmup_lr and the main phase starts at the base lr."""
    from cmhash.config.schema import Schedule
    from cmhash.training.schedule import build_scheduler

    base = 0.1
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    cfg = Schedule(name=entry.name, warmup_epochs=warmup)
    scheduler = build_scheduler(optimizer, cfg, epochs=30)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(math.isfinite(lr) and 0 < lr <= base * (1 + 1e-9) for lr in lrs), lrs
    if warmup:
        assert lrs[0] == pytest.approx(cfg.warmup_lr) and lrs[warmup] == pytest.approx(base)
    else:
        assert lrs[0] == pytest.approx(base)


@pytest.mark.parametrize("entry", [e for e in entries("datasets") if not (e.values[0].meta.get("precomputed") or e.values[0].meta.get("own_splits"))])
def test_each_dataset_has_split_sizes(entry):
    """Every dataset of images has the split sizes prepare uses: query, train and val, positive counts
    (precomputed features take theirs from the files; webdataset carves its own, by hash or by shard)."""
    knobs = entry.knobs()
    for split in ("query", "train", "val"):
        assert isinstance(getattr(knobs, split), int) and getattr(knobs, split) >= 1


@pytest.mark.parametrize("entry", entries("optimizers"))
def test_each_optimizer_builds_with_the_shared_knobs(entry):
    """build_optimizer makes the registered class over param groups, keeping each group's lr."""
    from cmhash.training.optimizers import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-4}]
    optimizer = build_optimizer(parse_params(choosing("train.optimizer.name", entry.name)).train.optimizer, groups)
    assert isinstance(optimizer, entry.load())
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
