"""params.yaml against its schema (cmhash.config.schema): the committed file, and the one-line message for
every kind of mistake, for every key. Keys, types and bounds are read from the schema itself, so a
knob added later is covered without editing this file."""

from __future__ import annotations

import copy
import inspect
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from cmhash.config.schema import MOVED, Params, leaf_keys, load_params, parse_params, section_at, section_type
from cmhash.errors import ConfigError
from conftest import unpack, with_value

REPO = Path(__file__).resolve().parents[1]
COMMITTED = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
LEAVES = leaf_keys()


# ------------------------------------------------------------------ reading the schema


def sections(model: type[BaseModel] = Params, loc: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type[BaseModel]]]:
    """Every section of the schema (the top level included) with its key path."""
    found = [(loc, model)]
    for name, field in model.model_fields.items():
        inner = section_type(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            found += sections(inner, (*loc, name))
    return found


SECTIONS = sections()


def field_of(key: str) -> FieldInfo:
    *parent, last = key.split(".")
    return section_at(tuple(parent)).model_fields[last]


def leaf_type(key: str) -> tuple[Any, list[Any], bool]:
    field = field_of(key)
    base, meta, optional = unpack(field.annotation)
    return base, [*field.metadata, *meta], optional


def is_stringish(base: Any) -> bool:
    """str, a Literal of strings, or a registry choice (a str with a validator)."""
    return base is str or (get_origin(base) is Literal and all(isinstance(v, str) for v in get_args(base)))


BOUND_TEXT = {"ge": "greater than or equal to", "gt": "greater than", "le": "less than or equal to", "lt": "less than"}


def bounds(metadata: list[Any]) -> dict[str, Any]:
    """{'ge': 0, 'lt': 1, 'min_length': 1, ...} from pydantic/annotated_types constraint objects."""
    out = {}
    for m in metadata:
        for attr in (*BOUND_TEXT, "min_length"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


def just_outside(kind: str, bound: Any, base: Any) -> Any:
    """The nearest value that the bound refuses (for a float, the next representable number)."""
    if kind in ("gt", "lt"):
        return bound
    step = -1 if kind == "ge" else 1
    return bound + step if base is int else math.nextafter(bound, step * math.inf)


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_params(raw, where="params.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("params.yaml: "), message
    return message


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a YAML mapping by dotted key (an empty mapping is a section, not a leaf)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ------------------------------------------------------------------ the committed file


def test_committed_params_parse():
    """params.yaml as committed is valid."""
    assert isinstance(load_params(REPO / "params.yaml"), Params)


def test_committed_params_list_every_key_of_the_schema():
    """Each leaf key of the schema is written out in params.yaml (DVC tracks only keys that are
    there), and every section is a mapping, even one without knobs (`losses.mse: {}`), so that a
    templated `losses.${loss}` resolves."""
    assert sorted(flatten(COMMITTED)) == sorted(LEAVES)
    for loc, _ in SECTIONS[1:]:
        node = COMMITTED
        for part in loc:
            assert isinstance(node, dict) and part in node, f"section {'.'.join(loc)} missing from params.yaml"
            node = node[part]
        assert isinstance(node, dict), f"{'.'.join(loc)} must be a mapping in params.yaml"


def test_schema_defaults_are_the_committed_params():
    """Defaults live in one place: `Params()` equals params.yaml value for value."""
    assert Params().model_dump(mode="json") == COMMITTED


def test_leaf_keys_are_the_schema_fields_that_hold_values():
    """leaf_keys() is exactly the non-section fields of every section (sanity of the derivation
    every other test here uses)."""
    expected = []
    for loc, model in SECTIONS:
        for name, field in model.model_fields.items():
            inner = section_type(field.annotation)
            if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
                expected.append(".".join((*loc, name)))
    assert sorted(LEAVES) == sorted(expected) and len(LEAVES) == len(set(LEAVES))


# ------------------------------------------------------------------ a bad value, for every key


@pytest.mark.parametrize("key", LEAVES)
def test_wrong_type_names_the_key_and_shows_the_value(key):
    """A string where a number/list/bool/choice belongs (a number where a string belongs) is one
    line: `<dotted key> = <value>: <what is wrong>`."""
    base, _, _ = leaf_type(key)
    value = 12345 if is_stringish(base) else "abc"
    message = error_of(with_value(COMMITTED, key, value))
    assert f"params.yaml: {key} = {value!r}: " in message, message


def bound_cases() -> list[Any]:
    """(key as the message names it, the key's bad value, bound kind, bound) for every bound of
    every leaf; a list's element bound is tested on its first item (`bits[0]`)."""
    cases = []
    for key in LEAVES:
        base, meta, _ = leaf_type(key)
        default = flatten(COMMITTED)[key]
        for kind, bound in bounds(meta).items():
            if kind == "min_length":
                cases.append(pytest.param(key, [], [], kind, bound, id=f"{key}-{kind}"))
            else:
                bad = just_outside(kind, bound, base)
                cases.append(pytest.param(key, bad, bad, kind, bound, id=f"{key}-{kind}"))
        if get_origin(base) in (list, tuple):
            item, item_meta, _ = unpack(get_args(base)[0])
            for kind, bound in bounds(item_meta).items():
                bad = just_outside(kind, bound, item)
                cases.append(pytest.param(f"{key}[0]", [bad, *default[1:]], bad, kind, bound, id=f"{key}[0]-{kind}"))
    return cases


BOUND_CASES = bound_cases()


def test_bounds_were_found():
    """The derivation sees the bounds (a schema refactor that hides them would silently test nothing)."""
    kinds = {case.values[3] for case in BOUND_CASES}
    assert {"ge", "gt", "le", "lt", "min_length"} <= kinds
    assert len(BOUND_CASES) > 50


@pytest.mark.parametrize(("shown_key", "value", "shown_value", "kind", "bound"), BOUND_CASES)
def test_value_just_outside_a_bound_says_what_is_allowed(shown_key, value, shown_value, kind, bound):
    """One line naming the key (list items as key[0]), the value, and the bound it breaks."""
    key = shown_key.removesuffix("[0]")
    message = error_of(with_value(COMMITTED, key, value))
    assert f"params.yaml: {shown_key} = {shown_value!r}: " in message, message
    if kind == "min_length":
        assert f"at least {bound} item" in message, message
    else:
        assert re.search(rf"{BOUND_TEXT[kind]} {re.escape(str(bound))}\b", message), message


def test_none_is_refused_where_the_schema_does_not_allow_it():
    """`key: null` (an empty YAML value) is a named error for every leaf that is not Optional."""
    for key in LEAVES:
        _, _, optional = leaf_type(key)
        if not optional:
            assert f"{key} = None: " in error_of(with_value(COMMITTED, key, None))


# ------------------------------------------------------------------ unknown and misspelled keys


@pytest.mark.parametrize(("loc", "model"), SECTIONS, ids=[".".join(loc) or "(top)" for loc, _ in SECTIONS])
def test_unknown_key_in_every_section(loc, model):
    """An unknown key is named in full; a near miss of each real key (two letters swapped, or one
    doubled for short keys) suggests exactly that key."""
    prefix = "".join(f"{part}." for part in loc)
    assert f"unknown key {prefix}zzz_unknown" in error_of(with_value(COMMITTED, prefix + "zzz_unknown", 1))
    for name in model.model_fields:
        typo = name[0] + name[2] + name[1] + name[3:] if len(name) >= 4 and name[1] != name[2] else name + name[-1]
        message = error_of(with_value(COMMITTED, prefix + typo, 1))
        assert message.endswith(f"unknown key {prefix}{typo}; did you mean {prefix}{name}?"), message


def test_the_example_typo():
    """The section renamed by a typo: the whole message, exactly."""
    raw = copy.deepcopy(COMMITTED)
    raw["train"]["fusoin"] = raw["train"].pop("fusion")
    assert error_of(raw) == "params.yaml: unknown key train.fusoin; did you mean train.fusion?"


@pytest.mark.parametrize("loc", [loc for loc, model in SECTIONS if not model.model_fields], ids=".".join)
def test_unknown_key_in_a_section_without_keys_says_it_has_none(loc):
    """`losses.mse`, `train.schedule.constant`: the message says the section takes no keys
    instead of ending in an empty list ("valid keys here: ")."""
    key = ".".join((*loc, "temperature"))
    message = error_of(with_value(COMMITTED, key, 0.1))
    assert f"unknown key {key}" in message
    assert not message.rstrip().endswith(":") and "no" in message.split(key, 1)[1], message


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_keys_point_at_their_new_place(old):
    """An old key is refused with its new place, and that place exists in the schema (`<arch>`,
    `<name>` standing for any registered name)."""
    message = error_of(with_value(COMMITTED, old, 1))
    assert message.endswith(f"unknown key {old}; it is now {MOVED[old]}"), message
    pattern = re.compile(re.sub(r"<\w+>", "[a-z_]+", re.escape(MOVED[old])))
    assert any(pattern.fullmatch(key) for key in LEAVES), f"{MOVED[old]} is no key of the schema"


# ------------------------------------------------------------------ checks across keys


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"train.schedule.warmup_epochs": 30}, ["warmup_epochs (30)", "train.fusion"]),
    ({"train.schedule.name": "multistep", "train.schedule.multistep.milestones": [20, 30]}, ["milestones", "[20, 30]"]),
    ({"train.schedule.name": "cosine", "train.schedule.cosine.eta_min": 5e-4}, ["eta_min", "train.fusion"]),
    ({"train.schedule.name": "cosine", "train.schedule.cosine.eta_min": 2e-4}, ["eta_min", "train.hash"]),  # below fusion's lr, above fusion_lr
    ({"train.schedule.warmup_epochs": 2, "train.schedule.warmup_lr": 1.0}, ["warmup_lr"]),
    ({"loss": "cosine_mse", "losses.cosine_mse.cosine_weight": 0, "losses.cosine_mse.mse_weight": 0}, ["losses.cosine_mse", "both 0"]),
], ids=["warmup-as-long-as-epochs", "milestone-past-epochs", "eta_min-above-lr", "eta_min-above-fusion_lr", "warmup_lr-above-lr",
        "cosine_mse-weights-0"])
def test_cross_field_checks_are_one_line(changes, fragments):
    raw = COMMITTED
    for key, value in changes.items():
        raw = with_value(raw, key, value)
    message = error_of(raw)
    assert all(fragment in message for fragment in fragments), message


# ------------------------------------------------------------------ through the CLI

PARAMS_COMMANDS = {"prepare": [], "extract": [], "train-fusion": [], "train-hash": [], "baselines": [], "evaluate": [], "report": [],
                   "index": ["--split", "train"]}


def test_every_command_with_params_is_covered():
    """Every CLI command that takes --params is in PARAMS_COMMANDS (so the test below sees it)."""
    from cmhash.cli import app

    with_params = {command.name for command in app.registered_commands if "params" in inspect.signature(command.callback).parameters}
    assert with_params == set(PARAMS_COMMANDS)


@pytest.mark.parametrize("mistake", ["misspelled-key", "bad-value"])
@pytest.mark.parametrize("command", sorted(PARAMS_COMMANDS))
def test_config_error_through_the_cli_is_one_line_and_writes_nothing(params, params_file, command, mistake):
    """Exit code 1, one `error: ` line naming the key, no traceback, and no file written (the
    check runs before anything else)."""
    from cmhash.cli import app

    if mistake == "misspelled-key":
        params["train"]["fusoin"] = params["train"].pop("fusion")
        expected = "unknown key train.fusoin; did you mean train.fusion?"
    else:
        params["train"]["fusion"]["lr"] = "fast"
        expected = "train.fusion.lr = 'fast': "
    params_file.write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, [command, "--params", str(params_file), *PARAMS_COMMANDS[command]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert "Traceback" not in result.output
    written = sorted(str(p.relative_to(params_file.parent)) for p in params_file.parent.rglob("*") if p != params_file)
    assert written == [], f"`cmhash {command}` wrote {written} before checking its params"
