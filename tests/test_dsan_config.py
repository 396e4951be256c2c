import argparse
import dataclasses

import pytest
import yaml

import testing  # noqa: F401  (puts the checkout on sys.path)
from dsan.config import (DEFAULTS, FIELDS, RunConfig, add_options, given_options, read_run_config, resolve,
                         save_config)
from dsan.errors import ConfigError


def test_precedence_defaults_file_command_line(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 1e-3\ndropout: 0.3\nepochs: 7\n")  # PyYAML reads 1e-3 as a string
    config = resolve(config_file, {"dropout": 0.0, "wk": None})
    assert (config.lr, config.dropout, config.wk, config.epochs) == (0.001, 0.0, 20.0, 7)
    assert resolve().epochs == DEFAULTS.epochs == 50


@pytest.mark.parametrize("text, message", [
    ("lr: fast\n", "c.yaml: lr: expected a number, got 'fast'"),
    ("epochs: 2.5\n", "c.yaml: epochs: expected an integer, got 2.5"),
    ("epochs: true\n", "c.yaml: epochs: expected an integer, got True"),
    ("refit: maybe\n", "c.yaml: refit: expected true or false, got 'maybe'"),
    ("dropout: 1\n", r"c.yaml: dropout must be < 1, got 1.0"),
    ("lr: .nan\n", "c.yaml: lr must be a finite number"),
    ("selection: best\n", "c.yaml: selection must be one of valid, test, none"),
    ("attention: sparsemax\n", "c.yaml: attention must be one of adaptive-entmax"),
    ("attention: entmax:0.5\n", "c.yaml: attention entmax:A needs a number A >= 1"),
    ("learning_rate: 1\n", "c.yaml: unknown option.s. learning_rate; known: data, protocol"),
    ("[1, 2]\n", "c.yaml: expected a mapping of option: value, got list"),
    ("lr: [\n", r"c.yaml:2: not valid YAML"),
])
def test_config_file_values_are_checked_and_named(tmp_path, text, message):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(config_file)


def test_json_config_files_and_their_errors(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text('{"batch-size": 64, "selection": "none"}')
    config = resolve(config_file)
    assert config.batch_size == 64 and config.selection == "none"
    config_file.write_text('{"lr": }')
    with pytest.raises(ConfigError, match=r"c.json:1: not valid JSON"):
        resolve(config_file)


@pytest.mark.parametrize("name, text, message", [
    ("c.json", '{"epochs": 1' + "0" * 5000 + "}", r"c.json: unreadable JSON \(Exceeds the limit \(4300 digits\)"),
    ("c.json", "[" * 100_000 + "]" * 100_000, r"c.json: unreadable JSON \(nested too deeply\)"),
    ("c.yaml", "epochs: 1" + "0" * 5000 + "\n", r"c.yaml: unreadable YAML \(Exceeds the limit \(4300 digits\)"),
    ("c.yaml", "[" * 100_000 + "]" * 100_000, r"c.yaml: unreadable YAML \(nested too deeply\)"),
    ("c.yaml", "epochs: 2020-13-45\n", r"c.yaml: unreadable YAML \(month must be in 1..12\)"),
])
def test_config_files_beyond_the_parser_limits_are_named(tmp_path, name, text, message):
    config_file = tmp_path / name
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(config_file)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="config.yaml: not a readable run configuration"):
        read_run_config(run)


def test_refit_needs_selection_on_validation():
    for selection in ("test", "none"):
        with pytest.raises(ConfigError, match="refit retrains for the epoch count selected on validation"):
            resolve(overrides={"refit": True, "selection": selection})
    assert resolve(overrides={"refit": True}).refit


def parse(argv):
    parser = argparse.ArgumentParser()
    add_options(parser)
    return given_options(parser.parse_args(argv))


def test_command_line_options_are_generated_from_the_fields(capsys):
    assert parse(["--lr", "0.01", "--refit", "--max-length", "50", "--selection", "test"]) == \
        {"lr": 0.01, "refit": True, "max_length": 50, "selection": "test"}
    assert parse(["--no-refit"]) == {"refit": False} and parse([]) == {}
    with pytest.raises(SystemExit):
        parse(["--lr", "fast"])
    assert "argument --lr: expected a number, got 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--selection", "best"])
    with pytest.raises(ConfigError, match="--epochs must be >= 1, got 0"):
        resolve(overrides=parse(["--epochs", "0"]))


def test_every_option_has_help_with_its_default():
    parser = argparse.ArgumentParser()
    add_options(parser)
    actions = {a.dest: a for a in parser._actions if a.dest in FIELDS}
    assert set(actions) == set(FIELDS)
    for name, action in actions.items():
        assert "(default: " in action.help, name
        default = FIELDS[name].default
        if default is not None and not isinstance(default, bool):
            assert f"(default: {default})" in action.help, name


def test_a_run_config_round_trips_and_old_run_configs_are_read(tmp_path):
    config = resolve(overrides={"data": "d", "epochs": 3, "selection": "test"})
    save_config(config, tmp_path)
    assert read_run_config(tmp_path) == config
    # written before `selection`: booleans, valid_fraction 0 and the run directory in the file
    old = {k: v for k, v in dataclasses.asdict(DEFAULTS).items() if k not in ("selection", "protocol", "max_length")}
    for flags, selection in [({"select_on_test": True}, "test"), ({"select_on_test": False, "valid_fraction": 0.0}, "none"),
                             ({"select_on_test": False, "valid_fraction": 0.2}, "valid")]:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(dict(old, run="r", data="d", **flags)))
        assert read_run_config(tmp_path).selection == selection
    (tmp_path / "config.yaml").write_text("epochs: [\n")
    with pytest.raises(ConfigError, match="config.yaml: not a readable run configuration"):
        read_run_config(tmp_path)
    with pytest.raises(ConfigError, match="is .* a dsan run directory"):
        read_run_config(tmp_path / "nothing")


def test_the_defaults_are_the_appendix_setting():
    assert (DEFAULTS.lr, DEFAULTS.dropout, DEFAULTS.wk, DEFAULTS.batch_size, DEFAULTS.embedding_dim) == \
        (1e-3, 0.5, 20.0, 512, 100)
    assert isinstance(DEFAULTS, RunConfig) and DEFAULTS.max_length >= 285  # Retailrocket's longest session


def test_config_file_encoding_is_named_like_the_data_files(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_bytes(b"\xef\xbb\xbfepochs: 3\nlr: 0.0\xff1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8 text \(byte 0xff at column 8\)"):
        resolve(config_file)
    config_file.write_bytes(b"\xef\xbb\xbfepochs: 3\n")  # a byte-order mark is accepted
    assert resolve(config_file).epochs == 3
