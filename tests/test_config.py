"""Config: tables from TOML, flags and records alike; a misplaced table or key, or a value
of the wrong type, refused in one line naming it."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from morec_rec.config import (
    HoldTarget,
    MoRecConfig,
    PrepareConfig,
    SamplerConfig,
    SourceConfig,
    TrainConfig,
    add_arguments,
    build,
    load_file,
)
from morec_rec.errors import MorecError

HOLD = {"accuracy": HoldTarget(relative=1.02), "revenue": HoldTarget(value=0.2)}


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, MoRecConfig)
    return parser.parse_args(argv)


def test_hold_from_toml_flag_and_record_agree(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text("[morec]\nki = 20\ncontrol = 'training'\ncoefficients = 'loss'\n\n"
                    "[morec.hold]\naccuracy = { relative = 1.02 }\nrevenue.value = 0.2\n")
    from_file = build(MoRecConfig, load_file(path, ("morec",))["morec"], None)
    from_flag = build(MoRecConfig, {"ki": 20, "control": "training", "coefficients": "loss"},
                      _flags("--hold", "accuracy.relative=1.02,revenue.value=0.2"))
    record = json.loads(json.dumps(dataclasses.asdict(from_file)))  # as run.json keeps it
    assert from_file.hold == from_flag.hold == build(MoRecConfig, record, None).hold == HOLD
    assert from_file == from_flag


def test_hold_flag_replaces_the_files_table() -> None:
    file_values = {"hold": {"accuracy": {"relative": 1.5}}}
    assert build(MoRecConfig, file_values, _flags("--hold", "")).hold == {}
    assert build(MoRecConfig, file_values, _flags()).hold == {"accuracy": HoldTarget(relative=1.5)}
    assert MoRecConfig().hold == {"accuracy": HoldTarget(relative=1.01)}
    assert MoRecConfig().hold is not MoRecConfig().hold  # no default shared between configs


@pytest.mark.parametrize(("hold", "message"), [
    ({"accuracy": {"relative": 1.0, "value": 0.2}}, "exactly one of relative, value"),
    ({"accuracy": {}}, "hold.accuracy: hold target {} is out of range"),
    ({"accuracy": {"relative": -1}}, "hold.accuracy: hold target {relative = -1.0}"),
    ({"accuracy": {"relative": "1.01"}}, "hold.accuracy = {'relative': '1.01'} needs numbers"),
    ({"accuracy": 1.01}, "hold.accuracy = 1.01 is not a table of relative, value"),
    ({"accuracy": {"value": 0.2}}, "hold.accuracy: an absolute value under validation control"),
])
def test_bad_hold_names_the_entry(hold: dict, message: str) -> None:
    with pytest.raises(MorecError, match=message.replace("{", r"\{").replace("(", r"\(")):
        build(MoRecConfig, {"hold": hold}, None)


def test_a_file_value_of_the_wrong_type_is_refused_under_its_flag() -> None:
    with pytest.raises(MorecError, match="config: epochs = '2' is not an int"):
        build(MoRecConfig, {"epochs": "2"}, _flags("--epochs", "1"))


@pytest.mark.parametrize(("text", "message"), [
    ("preference = [0.4, 0.3, 0.3]\n", "preference is not a section: it belongs in [morec]"),
    ("[sampler]\nseed = 1\n[foo]\nx = 1\n", "foo is not a section (expected train, morec)"),
    ("morec = 3\n", "morec = 3 is not a table: write [morec] above its keys"),
    ("[morec\n", "not valid TOML"),
])
def test_a_misplaced_table_or_key_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(MorecError, match="^" + re.escape(f"{path}: {message}")):
        load_file(path, ("train", "morec"))


def test_settings_made_in_python_take_numpy_numbers_as_plain_ones() -> None:
    config = SamplerConfig(sub_batch_size=np.int64(8), step=np.float32(0.5),
                           objectives=["accuracy", "revenue"])
    assert config == SamplerConfig(sub_batch_size=8, step=0.5, objectives=("accuracy", "revenue"))
    assert type(config.sub_batch_size) is int and type(config.step) is float
    json.dumps(dataclasses.asdict(config))  # as a run's record and MoRec's state keep it


@pytest.mark.parametrize(("values", "message"), [
    ({"sub_batch_size": 2.5}, "sub_batch_size = 2.5 is not an int"),
    ({"sub_batch_size": True}, "sub_batch_size = True is not an int"),
    ({"objectives": "accuracy"}, "objectives = 'accuracy' is not a tuple"),
    ({"draw": 3}, "draw = 3 is not a str"),
    ({"seed": -1}, r"seed = -1 is out of range \(expected >= 0\)"),
])
def test_settings_made_in_python_of_another_type_are_refused(values: dict, message: str) -> None:
    with pytest.raises(MorecError, match=f"^config: {message}"):
        SamplerConfig(**values)


def test_a_config_path_that_is_no_readable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(MorecError, match=f"^{re.escape(str(tmp_path))}: cannot read the config "
                                         r"file \(Is a directory\)"):
        load_file(tmp_path, ("train",))
    binary = tmp_path / "job.toml"
    binary.write_bytes(b"\xff\xfe[train]\n")
    with pytest.raises(MorecError, match=f"^{re.escape(str(binary))}: not valid TOML"):
        load_file(binary, ("train",))


def test_prepare_settings_that_cannot_read_the_data_are_refused() -> None:
    with pytest.raises(MorecError, match="^config: user_column, item_column, time_column, "
                                         "rating_column name column.s. 'timestamp' more than"):
        SourceConfig(rating_column="timestamp")
    with pytest.raises(MorecError, match="^config: item_column, price_column, category_column "
                                         "name column.s. 'item' more than once"):
        SourceConfig(category_column="item")
    with pytest.raises(MorecError, match=r"^config: min_rating = nan is not a finite number"):
        PrepareConfig(min_rating=float("nan"))


def test_a_key_in_the_wrong_table_names_the_tables_that_hold_it() -> None:
    with pytest.raises(MorecError, match=re.escape(
            "config: unknown key(s) objectives, speed for MoRecConfig; objectives is a key "
            "of [sampler]")):
        build(MoRecConfig, {"objectives": ["accuracy"], "speed": 1}, None)
    with pytest.raises(MorecError, match=re.escape("seed is a key of [prepare] or [train] or "
                                                   "[sampler]")):
        build(MoRecConfig, {"seed": 1}, None)


@pytest.mark.parametrize(("config", "field"), [
    (TrainConfig, "lr"), (TrainConfig, "negative_beta"), (MoRecConfig, "continued_lr")])
def test_an_infinite_number_is_refused_where_a_bound_alone_would_take_it(config: type,
                                                                       field: str) -> None:
    with pytest.raises(MorecError, match=f"^config: {field} = inf is not a finite number$"):
        config(**{field: float("inf")})
