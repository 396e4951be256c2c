"""The run configuration: one typed dataclass, the single source of every option's default,
allowed values and help text.

Layers: defaults < config file (YAML or JSON, the field names as keys) < command line. The
command-line options of `dsan train`, `tune` and `evaluate` are generated from the fields,
and the same checks validate every layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .data import PROTOCOLS
from .device import DEVICE_CHOICES
from .errors import ConfigError, require_extra
from .files import BYTE_ORDER_MARK, PARSER_LIMIT_ERRORS, parser_limit_reason, utf8_text
from .evaluate import METRICS

ATTENTION_NAMES = ("adaptive-entmax", "entmax-reference", "softmax", "entmax-bisect-lib")
ATTENTION_HELP = ("adaptive-entmax (the fused entmax_cuda op, learned alpha), entmax-reference (pure-PyTorch "
                  "bisection, learned alpha, slow), softmax, entmax:A (fixed alpha A >= 1), entmax-bisect-lib "
                  "(the `entmax` library, learned alpha)")
SELECTION_METRICS = tuple(METRICS)
SELECTIONS = ("valid", "test", "none")
PROTOCOL_NAMES = tuple(PROTOCOLS)


def _option(kind, default, help, *, choices=None, at_least=None, above=None, below=None, none=None,
            on_resume=False):
    """A RunConfig field: its type, default, allowed values and help; `none` says what None means;
    on_resume: may differ from the saved value when a run is resumed."""
    return field(default=default, metadata={"kind": kind, "choices": choices, "at_least": at_least, "above": above,
                                            "below": below, "none": none, "help": help, "on_resume": on_resume})


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on (defaults: the technical appendix's best setting)."""

    data: str | None = _option(str, None, "data folder with train.txt and test.txt", none="none: required")
    protocol: str | None = _option(
        str, None, "prefix rule of data without stats.json: dsan (inputs >= 2 clicks) or srgnn (>= 1)",
        choices=PROTOCOL_NAMES, none="the data's stats.json; without one dsan, said in a note")
    max_length: int = _option(int, 300, "longest input prefix: a longer one keeps its most recent clicks "
                                        "(the paper's data sets have none longer than 285)", at_least=1)
    epochs: int = _option(int, 50, "maximum training epochs", at_least=1, on_resume=True)
    batch_size: int = _option(int, 512, "training batch size (global, over all processes)", at_least=1)
    eval_batch_size: int = _option(int, 512, "evaluation batch size", at_least=1, on_resume=True)
    lr: float = _option(float, 1e-3, "Adam (amsgrad) learning rate", above=0)
    dropout: float = _option(float, 0.5, "dropout of the query projection, feed-forward and fusion outputs",
                             at_least=0, below=1)
    wk: float = _option(float, 20.0, "normalised weight w_k: scores are w_k * cosine", above=0)
    embedding_dim: int = _option(int, 100, "item (and position) embedding size", at_least=1)
    attention: str = _option(str, "adaptive-entmax", f"normaliser of both attentions: {ATTENTION_HELP}")
    selection: str = _option(
        str, "valid", "which epoch's model is tested: valid = best on a validation split (the latest "
                      "--valid-fraction of training sessions, early stopping); test = best on the TEST set "
                      "(the original's protocol: optimistic); none = the last of --epochs epochs on all sessions",
        choices=SELECTIONS)
    valid_fraction: float = _option(float, 0.1, "with --selection valid: the latest fraction of training "
                                                "sessions (by line order) that validates", above=0, below=1)
    refit: bool = _option(bool, False, "with --selection valid: after validation selects epoch E, retrain from "
                                       "scratch on all training sessions for E epochs (in RUN/refit) and test "
                                       "only that model")
    selection_metric: str = _option(str, "hr@20", "metric of the selection and early stopping: hr, mrr or ndcg at 5, 10 or 20",
                                    choices=SELECTION_METRICS)
    patience: int = _option(int, 3, "early stopping: epochs without improvement", at_least=1, on_resume=True)
    seed: int = _option(int, 1, "seed of the initialisation, dropout and batch order", at_least=0)
    bucket_pool: int = _option(int, 64, "sort each pool of N shuffled batches by prefix length (less padding); "
                                        "0 = plain random batches", at_least=0)
    device: str = _option(str, "auto", "auto = CUDA when available", choices=DEVICE_CHOICES, on_resume=True)
    threads: int | None = _option(int, None, "CPU threads per process", at_least=1, none="cores / processes",
                                  on_resume=True)
    max_minutes: float | None = _option(float, None, "wall-clock budget: stop before an epoch that would "
                                                     "overrun it, then test (--resume continues)", above=0,
                                        none="no limit", on_resume=True)
    max_train_batches: int | None = _option(int, None, "debugging/timing: only the first N batches per epoch",
                                            at_least=1, none="all")
    max_eval_batches: int | None = _option(int, None, "debugging/timing: only the first N evaluation batches",
                                           at_least=1, none="all")

    @property
    def selects(self) -> bool:
        return self.selection != "none"


FIELDS = {f.name: f for f in fields(RunConfig)}
DEFAULTS = RunConfig()
KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


COMMAND_LINE = "--"  # the `where` of options given on the command line


def _label(name: str, where: str) -> str:
    """How an error names an option: as its flag (--max-length) on the command line, else as its key."""
    return f"--{name.replace('_', '-')}" if where == COMMAND_LINE else f"{where}{name}"


def _coerce(name: str, value, where: str):
    """value as the field's type: YAML/JSON values or command-line strings; anything else is an error."""
    meta = FIELDS[name].metadata
    kind = meta["kind"]
    if value is None:
        if FIELDS[name].default is None:
            return None
        raise ConfigError(f"{_label(name, where)}: expected {KIND_NAMES[kind]}, got nothing (null)")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.isascii():
            try:
                return float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise ConfigError(f"{_label(name, where)}: expected {KIND_NAMES[kind]}, got {value!r}")


def check_value(name: str, value, where: str = "", label: str | None = None) -> None:
    """The field's allowed values (choices, range; attention names); `label` names a renamed flag."""
    meta = FIELDS[name].metadata
    if value is None:
        return
    problem = None
    if meta["choices"] and value not in meta["choices"]:
        problem = f"must be one of {', '.join(meta['choices'])}"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = "must be a finite number"
    elif meta["at_least"] is not None and value < meta["at_least"]:
        problem = f"must be >= {meta['at_least']}"
    elif meta["above"] is not None and not value > meta["above"]:
        problem = f"must be > {meta['above']}"
    elif meta["below"] is not None and not value < meta["below"]:
        problem = f"must be < {meta['below']}"
    elif name == "attention":
        problem = attention_problem(value)
    if problem:
        raise ConfigError(f"{label or _label(name, where)} {problem}, got {value!r}")


def attention_problem(name: str) -> str | None:
    """Why `name` is not an attention normaliser (None if it is one)."""
    if name in ATTENTION_NAMES:
        return None
    if name.startswith("entmax:"):
        try:
            alpha = float(name.split(":", 1)[1])
        except ValueError:
            alpha = math.nan
        return None if 1 <= alpha < math.inf else "entmax:A needs a number A >= 1"
    return f"must be one of {', '.join(ATTENTION_NAMES)} or entmax:A"


def fixed_alpha(name: str) -> float:
    """A of the normaliser entmax:A (checked by attention_problem)."""
    return float(name.split(":", 1)[1])


def _validated(values: dict, where: str) -> dict:
    """{name: typed and checked value}; unknown names are an error."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}unknown option(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    checked = {}
    for name, value in values.items():
        checked[name] = _coerce(name, value, where)
        check_value(name, checked[name], where)
    return checked


def read_config_file(path) -> dict:
    """The options a YAML or JSON file sets (keys may be spelled with - or _)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    if raw.startswith(BYTE_ORDER_MARK):
        raw = raw[len(BYTE_ORDER_MARK):]
    text = utf8_text(path, raw, error=ConfigError)
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except PARSER_LIMIT_ERRORS as e:
            raise ConfigError(f"{path}: unreadable JSON ({parser_limit_reason(e)})") from None
    else:
        yaml = require_extra("yaml")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise ConfigError(f"{path}{'' if line is None else f':{line + 1}'}: not valid YAML: "
                              f"{getattr(e, 'problem', None) or e}") from None
        except PARSER_LIMIT_ERRORS as e:
            raise ConfigError(f"{path}: unreadable YAML ({parser_limit_reason(e)})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    return _validated({str(k).replace("-", "_"): v for k, v in values.items()}, f"{path}: ")


def resolve(config_file=None, overrides=None, base: RunConfig | None = None) -> RunConfig:
    """base (defaults, or a run's saved config) < config file < overrides (None values ignored)."""
    values = dataclasses.asdict(base or DEFAULTS)
    if config_file:
        values.update(read_config_file(config_file))
    given = {name: value for name, value in (overrides or {}).items() if value is not None}
    values.update(_validated(given, COMMAND_LINE))
    config = RunConfig(**values)
    if config.refit and config.selection != "valid":
        raise ConfigError(f"refit retrains for the epoch count selected on validation: it needs selection valid, "
                          f"got selection {config.selection}")
    return config


def differences(a: RunConfig, b: RunConfig, names=None) -> list:
    """Names (of `names`, default all) whose values differ."""
    return [name for name in (names or FIELDS) if getattr(a, name) != getattr(b, name)]


# ---------------------------------------------------------------- a run directory's config.yaml

CONFIG_FILE = "config.yaml"


def save_config(config: RunConfig, run_dir) -> None:
    from .files import write_atomically

    yaml = require_extra("yaml")
    write_atomically({Path(run_dir) / CONFIG_FILE: yaml.safe_dump(dataclasses.asdict(config), sort_keys=True)})


def read_run_config(run_dir) -> RunConfig:
    """The configuration saved in RUN/config.yaml (written by any version of dsan train)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found (is {run_dir} a dsan run directory?)")
    yaml = require_extra("yaml")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, *PARSER_LIMIT_ERRORS) as e:
        raise ConfigError(f"{path}: not a readable run configuration ({type(e).__name__})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: not a run configuration (expected a mapping)")
    # configurations written before `selection` existed: two booleans and valid_fraction 0
    values.pop("run", None)
    if "select_on_test" in values:
        select_on_test = values.pop("select_on_test")
        if select_on_test:
            values["selection"] = "test"
        elif values.get("valid_fraction") == 0:
            values.update(selection="none", valid_fraction=DEFAULTS.valid_fraction)
    return resolve(base=RunConfig(**_validated(values, f"{path}: ")))


# ---------------------------------------------------------------- command-line options


def _default_text(f) -> str:
    return f.metadata["none"] if f.default is None else str(f.default).lower() if f.metadata["kind"] is bool \
        else str(f.default)


METAVARS = {int: "N", float: "X", str: "NAME", "data": "DIR", "selection_metric": "METRIC@K"}


def add_options(parser: argparse.ArgumentParser, names=None, exclude=(), flags=None) -> None:
    """Adds --NAME for each field (default: all); the default is None, so only the options given
    override the lower layers. `flags` renames options ({name: '--flag'})."""
    flags = flags or {}
    for name in names or FIELDS:
        if name in exclude:
            continue
        f = FIELDS[name]
        meta = f.metadata
        flag = flags.get(name, "--" + name.replace("_", "-"))
        text = f"{meta['help']} (default: {_default_text(f)})"
        if meta["kind"] is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        kind = meta["kind"]

        def parse(value, name=name, kind=kind):
            try:
                return _coerce(name, value, "")
            except ConfigError:
                raise argparse.ArgumentTypeError(f"expected {KIND_NAMES[kind]}, got {value!r}") from None

        metavar = METAVARS.get(name) or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else METAVARS[kind])
        parser.add_argument(flag, dest=name, type=parse, default=None, choices=meta["choices"], metavar=metavar,
                            help=text)


def given_options(args: argparse.Namespace) -> dict:
    """The RunConfig options given on the command line."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
