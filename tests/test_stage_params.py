"""dvc.yaml's per-stage `params` against what each stage's command reads (`reads()` in its
pipeline module): equal as lists of keys, for the committed params.yaml and for every registered
loss, architecture, schedule, dataset and optimiser chosen in turn; and equal in effect - a stage's
fingerprint (a hash of what it reads) moves exactly when one of its listed params changes. Keys and
"another valid value" for each are derived from the schema, not written by hand."""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import AfterValidator, BaseModel

from cmhash.config.choices.archs import ARCHS
from cmhash.config.choices.datasets import DATASETS
from cmhash.config.choices.losses import LOSSES
from cmhash.config.choices.optimizers import OPTIMIZERS
from cmhash.config.choices.schedules import SCHEDULES
from cmhash.config.registry import Registry
from cmhash.config.schema import Params, leaf_keys, parse_params, section_at
from cmhash.errors import ConfigError
from conftest import unpack, with_value

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
STAGES = sorted(DVC_YAML["stages"])
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
LEAVES = leaf_keys()
CHOICES = {"loss": LOSSES, "model.arch": ARCHS, "train.schedule.name": SCHEDULES, "data.name": DATASETS, "train.optimizer.name": OPTIMIZERS}


# ------------------------------------------------------------------ helpers


def get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


VARIANTS = {"committed": COMMITTED} | {
    f"{key}={name}": with_value(COMMITTED, key, name) for key, registry in CHOICES.items() for name in registry.names() if name != get(COMMITTED, key)
}


def reads(stage: str, p: Params) -> dict[str, Any]:
    """The stage's command's reads(); the stage name in dvc.yaml is its module's name."""
    return importlib.import_module(f"cmhash.pipeline.{stage}").reads(p)


def resolve(stage: str, p: Params, dvc_yaml: dict = DVC_YAML) -> list[str]:
    """The stage's `params` list with each ${a.b} replaced by the value at a.b, as DVC does."""
    values = p.model_dump(mode="json")
    out = []
    for entry in dvc_yaml["stages"][stage].get("params", []):
        assert isinstance(entry, str), f"{stage}: params from another file: {entry}"
        out.append(re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(get(values, m.group(1))), entry))
    return out


def fingerprint(values: dict[str, Any]) -> str:
    dumped = {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for k, v in values.items()}
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, default=list).encode()).hexdigest()


def covered(key: str, params: list[str]) -> bool:
    """`key` is a listed param or inside one (`train.fusion.lr` inside `train.fusion`)."""
    return any(key == p or key.startswith(p + ".") for p in params)


# ------------------------------------------------------------------ "another valid value", from the schema


def within(value: float, meta: list[Any]) -> bool:
    for m in meta:
        for attr, ok in (("ge", lambda b: value >= b), ("gt", lambda b: value > b), ("le", lambda b: value <= b), ("lt", lambda b: value < b)):
            if getattr(m, attr, None) is not None and not ok(getattr(m, attr)):
                return False
    return True


def others(base: Any, meta: list[Any], optional: bool, current: Any) -> list[Any]:
    """Candidate values of this type, each different from `current`, the likeliest valid first.
    Constraints a type cannot show (a custom validator, a check across keys) are left to the
    parser: the caller keeps the first candidate the whole file accepts."""
    if optional and current is not None:
        return [None, *others(base, meta, False, current)]
    if current is None:  # a valid non-None value: a plain one of the type, then its variations
        item = unpack(get_args(base)[0])[0] if get_origin(base) is list else base
        example = {int: 2, float: 0.5, str: "x"}[item]
        example = [example] if item is not base else example
        return [example, *others(base, meta, False, example)]
    registries = [getattr(m.func, "__self__", None) for m in meta if isinstance(m, AfterValidator)]
    if registries and isinstance(registries[0], Registry):
        return [name for name in registries[0].names() if name != current]
    if get_origin(base) is Literal:
        return [v for v in get_args(base) if v != current]
    if base is bool:
        return [not current]
    if base is int:
        return [v for v in (current + 1, current - 1) if within(v, meta)]
    if base is float:
        return [v for v in (current * 2, current / 2, current + 0.5, current + 0.1) if v != current and within(v, meta)]
    if base is str:
        return [current + "x", "cpu"]  # "cpu": a value the constrained string (`device`) accepts
    if get_origin(base) is list:  # one item more, one fewer, every item varied
        item, item_meta, _ = unpack(get_args(base)[0])
        if not current:  # an empty list: one plain item
            return [[others(item, item_meta, False, None)[0]]]
        longer = [[*current, v] for v in others(item, item_meta, False, current[-1])] if current else []
        shorter = [current[:-1]] if current else []
        varied = [[(others(item, item_meta, False, v) or [v])[0] for v in current]]
        return [*longer, *shorter, *varied]
    if get_origin(base) is tuple:
        item, item_meta, _ = unpack(get_args(base)[0])
        return [[v, *current[1:]] for v in others(item, item_meta, False, current[0])]
    raise AssertionError(f"no way to vary a {base}")


def another_valid(raw: dict, key: str) -> tuple[dict, Params] | None:
    """`raw` with `key` changed to another value the schema accepts (whole file parsed), or None."""
    *parent, last = key.split(".")
    field = section_at(tuple(parent)).model_fields[last]
    base, meta, optional = unpack(field.annotation)
    for candidate in others(base, [*field.metadata, *meta], optional, get(raw, key)):
        changed = with_value(raw, key, candidate)
        try:
            return changed, parse_params(changed)
        except ConfigError:
            continue
    return None


# ------------------------------------------------------------------ the tests


def test_every_stage_has_a_reads_function():
    """Each dvc.yaml stage has a pipeline module of its name with reads()."""
    for stage in STAGES:
        assert callable(importlib.import_module(f"cmhash.pipeline.{stage}").reads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dvc_params_are_the_keys_each_stage_reads(variant):
    """The resolved `params` of each stage equal the keys of its `reads()` (no duplicate, none missing)."""
    p = parse_params(VARIANTS[variant])
    for stage in STAGES:
        listed = resolve(stage, p)
        assert len(listed) == len(set(listed)), f"{stage}: duplicate params {listed}"
        assert sorted(listed) == sorted(reads(stage, p)), stage


def test_variants_cover_every_registered_choice():
    """One variant per registered name that the committed file does not choose."""
    assert len(VARIANTS) == 1 + sum(len(r) - 1 for r in CHOICES.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_stage_fingerprint_moves_exactly_with_its_params(variant):
    """For every leaf key changed to another valid value: a stage's fingerprint changes if and
    only if the key is (inside) one of its resolved params. Keys with no other valid value the
    whole file accepts are skipped and counted."""
    raw = VARIANTS[variant]
    p = parse_params(raw)
    before = {stage: fingerprint(reads(stage, p)) for stage in STAGES}
    listed = {stage: resolve(stage, p) for stage in STAGES}
    skipped = []
    for key in LEAVES:
        found = another_valid(raw, key)
        if found is None:
            skipped.append(key)
            continue
        changed, q = found
        for stage in STAGES:
            moved = fingerprint(reads(stage, q)) != before[stage]
            assert moved == covered(key, listed[stage]), (
                f"{stage}: changing {key} to {get(changed, key)!r} {'changes' if moved else 'does not change'} what it reads, "
                f"but {key} is {'' if covered(key, listed[stage]) else 'not '}among its dvc.yaml params")
    assert len(skipped) <= 0.1 * len(LEAVES), f"too many keys never varied: {skipped}"


def test_every_leaf_key_finds_another_valid_value():
    """The generator above varies (nearly) every key of the committed file; list the rest."""
    skipped = [key for key in LEAVES if another_valid(COMMITTED, key) is None]
    assert len(skipped) <= 0.1 * len(LEAVES), skipped
    assert skipped == [], f"not varied (no other valid value found): {skipped}"


@pytest.mark.parametrize("key", [k for k in LEAVES if k.startswith(("hash_head.", "train.hash.")) or k == "bits"])
def test_task_1_knobs_do_not_touch_train_fusion(key):
    """hash_head.*, train.hash.* and bits change train_hash's inputs but neither what train_fusion
    reads nor its params list."""
    p = parse_params(COMMITTED)
    changed, q = another_valid(COMMITTED, key)
    assert fingerprint(reads("train_fusion", q)) == fingerprint(reads("train_fusion", p))
    assert resolve("train_fusion", q) == resolve("train_fusion", p)
    assert fingerprint(reads("train_hash", q)) != fingerprint(reads("train_hash", p))


def test_unchosen_sections_are_not_params():
    """Only the chosen loss/arch/schedule/dataset section is a param of any stage."""
    p = parse_params(COMMITTED)
    for key, registry in CHOICES.items():
        section = {"loss": "losses", "model.arch": "model", "train.schedule.name": "train.schedule", "data.name": "data"}.get(key)
        if section is None:
            continue
        chosen = get(COMMITTED, key)
        for stage in STAGES:
            for name in registry.names():
                if name != chosen:
                    assert not any(covered(f"{section}.{name}", [param]) for param in resolve(stage, p)), (stage, name)


# ------------------------------------------------------------------ DVC itself


def dvc_params(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage, DVC's resolved params and the ones it finds in params.yaml."""
    from dvc.repo import Repo

    out = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    out[stage.name] = (list(dep.params), sorted(dep.read_params()))
    return out


def test_dvc_resolves_the_templated_params_as_we_do(tmp_path, monkeypatch):
    """Real DVC on a copy of dvc.yaml and params.yaml: it parses the templated stages, resolves
    `losses.${loss}` etc. to the same keys as `resolve` above, and finds each one in params.yaml -
    for the committed file and for a file choosing another entry of every registry."""
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True).close()
    other = COMMITTED
    for key, registry in CHOICES.items():
        other = with_value(other, key, next(n for n in reversed(registry.names()) if n != get(COMMITTED, key)))
    for raw in (COMMITTED, other):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        p = parse_params(raw)
        found = dvc_params(tmp_path)
        assert sorted(found) == STAGES
        for stage, (listed, in_file) in found.items():
            assert listed == resolve(stage, p), stage
            assert in_file == sorted(listed), f"{stage}: DVC cannot find {set(listed) - set(in_file)} in params.yaml"


def test_fingerprint_is_stable():
    """Same values, same fingerprint (a dict order or a fresh parse does not move it)."""
    p, q = parse_params(COMMITTED), parse_params(copy.deepcopy(COMMITTED))
    for stage in STAGES:
        values = reads(stage, p)
        assert fingerprint(values) == fingerprint(reads(stage, q)) == fingerprint(dict(reversed(values.items())))
