import errno
import json
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from testing import RETAILROCKET, TINY_TRAINING, make_tiny_synthetic, require, subprocess_env, train_tiny
from dsan import config as config_module
from dsan.cli import INTERRUPTED_STATUS, build_parser, main
from dsan.errors import EXTRA_HINT, DsanError
from dsan.model import DSAN
from dsan.train import Trainer


def tiny_options(**overrides):
    options = []
    for name, value in dict(TINY_TRAINING, **overrides).items():
        options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def fails(argv, capsys, message) -> str:
    """Runs the command line, which must fail with exit status 2 and one line naming `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("dsan-cli-run") / "run"
    train_tiny(data_dir, run, epochs=1)
    return run


def copy_data(data_dir, target, train=None, test=None, stats=True):
    target.mkdir(parents=True)
    for name in ("train.txt", "test.txt") + (("stats.json",) if stats else ()):
        shutil.copy(data_dir / name, target / name)
    if train is not None:
        (target / "train.txt").write_text(train)
    if test is not None:
        (target / "test.txt").write_text(test)
    return target


# ---------------------------------------------------------------- commands and help


def test_python_dash_m_dsan_lists_the_commands(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsan", "--help"], env=subprocess_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("prepare", "train", "evaluate", "explain", "tune", "demo"):
        assert command in result.stdout


def test_every_option_of_every_command_has_help_with_its_default_or_says_required():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            assert "default: " in action.help or "required" in action.help.lower() \
                or action.dest == "dataset", (name, action.dest, action.help)
    prepare_raw = next(a for a in commands.choices["prepare"]._actions if a.dest == "raw")
    assert prepare_raw.help.startswith("REQUIRED for diginetica")
    subset = next(a for a in commands.choices["tune"]._actions if a.dest == "subset")
    assert "a parameter not named keeps all its appendix values" in subset.help


# ---------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_prepares_trains_evaluates_and_draws(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--sessions", "500", "--items", "100",
                 "--attention", "entmax-reference"]) == 0
    printed = capsys.readouterr().out
    assert "most-popular baseline" in printed and "HR@K" in printed and "(the longest)" in printed
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "run" / "test_metrics.json").read_text())["test"]["samples"] > 0


@pytest.mark.slow
def test_demo_without_the_kernels_fails_clearly_instead_of_falling_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "entmax_cuda", None)  # import entmax_cuda now raises ImportError
    fails(["demo", "--out", str(tmp_path / "demo")], capsys, "--attention adaptive-entmax needs the compiled "
          "entmax_cuda kernels")
    assert not (tmp_path / "demo").exists()


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "c.yaml").write_text("lr: 0.1\n")
    with pytest.raises(DsanError, match="install dsan's extras") as error:
        config_module.read_config_file(tmp_path / "c.yaml")
    assert EXTRA_HINT in str(error.value) and '".[dsan]"' in EXTRA_HINT


# ---------------------------------------------------------------- inputs: one line, exit 2, nothing half-written


def test_prepare_command_reports_errors_with_the_file(tmp_path, capsys):
    fails(["prepare", "retailrocket", "--raw", str(tmp_path / "events.csv"), "--out", str(tmp_path / "o")], capsys,
          "events.csv: no such file")
    fails(["prepare", "retailrocket", "--out", str(tmp_path / "o")], capsys, "--raw FILE is required")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("train, message", [
    ("1 2 3\n4 100000000000000000000 5\n", "train.txt:2: item id 100000000000000000000 is beyond the 64-bit"),
    ("1 2 3\n4 \u0661 5\n", "train.txt:2: item id '\u0661' is not a positive integer in ASCII digits"),
    ("1 2 3\n4 1_0 5\n", "train.txt:2: item id '1_0' is not a positive integer in ASCII digits"),
    ("1 2 3\n4 +2 5\n", "train.txt:2: item id '+2' is not a positive integer in ASCII digits"),
])
def test_bad_item_ids_stop_training_before_the_run_exists(data_dir, tmp_path, capsys, train, message):
    data = copy_data(data_dir, tmp_path / "data", train=train, stats=False)
    fails(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--quiet"], capsys, message)
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_and_malformed_stats_json_are_named(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data")
    (data / "test.txt").write_bytes(b"1 2 3\n4 5 \xff\n")
    fails(["evaluate", "--model", "pop", "--data", str(data)], capsys, "test.txt:2: not UTF-8 text (byte 0xff")
    data = copy_data(data_dir, tmp_path / "data2")
    (data / "stats.json").write_text("[]")
    fails(["evaluate", "--model", "pop", "--data", str(data)], capsys, "stats.json: expected a JSON object")


def test_a_test_split_without_samples_is_an_error_not_zeros(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data", test="1 2\n3 4\n")
    fails(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--quiet"], capsys,
          "the test set (test.txt) yields no samples: none of its 2 sessions has more than 2 clicks")
    fails(["evaluate", "--model", "pop", "--data", str(data)], capsys, "the test split yields no samples")
    assert not (tmp_path / "run").exists()


def test_a_test_split_emptied_by_dropping_unseen_items_says_so(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data", test="8001 9001 7001\n9001 8001 7001 6001\n1 2\n", stats=False)
    message = ("the test set (test.txt) yields no samples: dropping its 7 clicks on items never seen in training left "
               "none of its 3 sessions with more than 2 clicks")
    fails(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--quiet"], capsys, message)
    fails(["evaluate", "--model", "pop", "--data", str(data)], capsys,
          "the test split yields no samples: dropping its 7")
    assert not (tmp_path / "run").exists()


def test_a_validation_split_of_no_session_suggests_the_options(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data", train="1 2 3 4\n4 3 2 1\n", test="1 2 3\n", stats=False)
    message = ("train.txt: the validation split (the latest 0.1 of its 2 sessions) has no session: raise "
               "--valid-fraction, or train with --selection none")
    fails(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--quiet"], capsys, message)
    fails(["evaluate", "--model", "pop", "--data", str(data), "--split", "valid"], capsys, message)
    assert not (tmp_path / "run").exists()
    assert main(["evaluate", "--model", "pop", "--data", str(data)]) == 0  # the test split needs no validation


def test_a_non_numeric_config_value_is_one_line(data_dir, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    fails(["train", "--data", str(data_dir), "--run", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")],
          capsys, "c.yaml: lr: expected a number, got 'fast'")
    assert not (tmp_path / "run").exists()


def test_option_errors_spell_the_option_as_typed(data_dir, tmp_path, capsys):
    fails(["train", "--data", str(data_dir), "--run", str(tmp_path / "run"), "--max-length", "0"], capsys,
          "error: --max-length must be >= 1, got 0")
    fails(["tune", "--data", str(data_dir), "--out", str(tmp_path / "tune"), "--eval-batch-size", "0"], capsys,
          "error: --eval-batch-size must be >= 1, got 0")
    for value in ("0", "-1"):  # 0 was taken for the default, -1 gave metrics of no sample
        fails(["evaluate", "--model", "pop", "--data", str(data_dir), "--batch-size", value], capsys,
              f"error: --batch-size must be >= 1, got {value}")
    fails(["evaluate", "--model", "pop", "--data", str(data_dir), "--split", "valid", "--valid-fraction", "5"], capsys,
          "error: --valid-fraction must be < 1, got 5.0")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tune").exists()


def test_data_without_stats_json_says_the_protocol_it_assumes_and_takes_another(data_dir, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path / "data", stats=False)
    assert main(["train", "--data", str(data), "--run", str(tmp_path / "dsan"), "--quiet"] + tiny_options(epochs=1)
                + ["--max-train-batches", "1", "--max-eval-batches", "1"]) == 0
    log = (tmp_path / "dsan" / "train.log").read_text()
    assert "note: " in log and "no stats.json, assuming the dsan protocol" in log and "dsan protocol" in log
    assert main(["train", "--data", str(data), "--run", str(tmp_path / "srgnn"), "--quiet", "--protocol", "srgnn"]
                + tiny_options(epochs=1) + ["--max-train-batches", "1", "--max-eval-batches", "1"]) == 0
    assert "srgnn protocol" in (tmp_path / "srgnn" / "train.log").read_text()
    dsan_count = json.loads((tmp_path / "dsan" / "metrics.jsonl").read_text().splitlines()[0])
    assert json.loads((tmp_path / "srgnn" / "test_metrics.json").read_text())["valid"]["samples"] >= \
        dsan_count["valid"]["samples"]


def test_a_session_of_a_hundred_thousand_clicks_keeps_its_most_recent_ones(data_dir, tmp_path, capsys):
    long_session = " ".join(str(1 + i % 150) for i in range(100_000))
    train = (data_dir / "train.txt").read_text() + long_session + "\n"  # the latest: a validation session
    data = copy_data(data_dir, tmp_path / "data", train=train, stats=False)
    assert main(["train", "--data", str(data), "--run", str(tmp_path / "run"), "--quiet"] + tiny_options(epochs=1)
                + ["--max-train-batches", "2", "--max-eval-batches", "1", "--max-length", "40"]) == 0
    assert "input prefixes longer than --max-length 40 keep their most recent clicks" in \
        (tmp_path / "run" / "train.log").read_text()
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["model_args"]["max_session_length"] == 40
    assert config_module.DEFAULTS.max_length == 300  # the default: no truncation on the paper's data (<= 285)


# ---------------------------------------------------------------- checkpoints, disks, runs


@pytest.mark.parametrize("content, message", [
    (b"", "best.pt: empty file, not a checkpoint"),
    (b"not a checkpoint at all", "best.pt: not a readable dsan checkpoint"),
    (b"hello\n", "best.pt: not a readable dsan checkpoint"),  # the unpickler raises KeyError on it
    ("truncated", "best.pt: not a readable dsan checkpoint"),
    ("foreign", "best.pt: not a dsan checkpoint (expected the keys model, model_args)"),
    ("wrong tensors", "best.pt: its tensors do not fit this model (size mismatch for item_embedding.weight: "),
])
def test_corrupt_truncated_empty_or_foreign_checkpoints_are_named(run_dir, tmp_path, capsys, content, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if content == "truncated":
        content = (run / "best.pt").read_bytes()[:1000]
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, run / "foreign.pt")
        content = (run / "foreign.pt").read_bytes()
    elif content == "wrong tensors":
        best = torch.load(run / "best.pt", weights_only=True)
        best["model"]["item_embedding.weight"] = torch.zeros(3, 16)
        torch.save(dict(best, state={}, optimizer={}), run / "wrong.pt")
        content = (run / "wrong.pt").read_bytes()
    (run / "best.pt").write_bytes(content)
    fails(["evaluate", "--run", str(run), "--device", "cpu"], capsys, message)
    (run / "last.pt").write_bytes(content)
    config_before = (run / "config.yaml").read_bytes()
    fails(["train", "--run", str(run), "--resume", "--quiet"], capsys, message.replace("best.pt", "last.pt"))
    assert (run / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize("change, message", [
    ({"n_items": -5}, "n_items must be a positive integer, got -5"),
    ({"embedding_dim": 0}, "embedding_dim must be a positive integer, got 0"),
    ({"max_session_length": "40"}, "max_session_length must be a positive integer, got '40'"),
    ({"attention": "bogus"}, "attention must be one of adaptive-entmax"),
])
def test_checkpoint_model_args_that_describe_no_model_name_the_file(run_dir, tmp_path, capsys, change, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    best = torch.load(run / "best.pt", weights_only=True)
    torch.save(dict(best, model_args=dict(best["model_args"], **change)), run / "best.pt")
    fails(["evaluate", "--run", str(run), "--device", "cpu"], capsys,
          f"best.pt: its model_args do not describe a DSAN model ({message}")


def test_a_plain_pickle_checkpoint_is_one_line_without_torch_warnings(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "best.pt").write_bytes(pickle.dumps({"model": 1, "model_args": 2}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fails(["evaluate", "--run", str(run), "--device", "cpu"], capsys, "best.pt: not a readable dsan checkpoint")
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_resume_checks_the_selected_checkpoint_before_touching_the_run(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    fails(["train", "--run", str(run), "--resume", "--quiet"], capsys, "best.pt: not a readable dsan checkpoint")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # metrics.jsonl and train.log included


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(data_dir, tmp_path, capsys, monkeypatch):
    real_write_bytes = Path.write_bytes

    def write_bytes_on_a_full_disk(path, data):
        if path.name.startswith(".best.pt.tmp"):
            real_write_bytes(path, data[:len(data) // 2])  # part of the file was written, then the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes_on_a_full_disk)
    err = fails(["train", "--data", str(data_dir), "--run", str(tmp_path / "run"), "--quiet"] + tiny_options(epochs=1),
                capsys, "No space left on device (nothing was changed)")
    assert f"cannot write {tmp_path / 'run' / 'best.pt'}: No space" in err  # the file asked for, not the temporary
    assert not list((tmp_path / "run").glob(".*tmp*")) and not (tmp_path / "run" / "best.pt").exists()


def test_prepare_on_a_full_disk_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    real_write_text = Path.write_text

    def write_text_on_a_full_disk(path, data, *args, **kwargs):
        if path.name.startswith(".test.txt.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_text(path, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text_on_a_full_disk)
    out = tmp_path / "new" / "data"
    fails(["prepare", "synthetic", "--out", str(out), "--sessions", "300", "--items", "50"], capsys,
          f"cannot write {out / 'test.txt'}: No space left on device (nothing was changed)")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    fails(["prepare", "synthetic", "--out", str(tmp_path / "kept"), "--sessions", "300", "--items", "50"], capsys,
          "No space left on device")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    fails(["prepare", "synthetic", "--out", str(tmp_path / "a-file" / "data")], capsys, "a-file/data: Not a directory")


def test_resume_on_other_data_fails_before_touching_the_run(run_dir, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    other = make_tiny_synthetic(tmp_path / "other", seed=2)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    fails(["train", "--run", str(run), "--resume", "--data", str(other), "--quiet"], capsys,
          "--resume continues")
    fails(["train", "--run", str(run), "--resume", "--embedding-dim", "8", "--quiet"], capsys,
          "embedding_dim 16 -> 8 cannot change")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_run_finds_its_data_from_any_working_directory(data_dir, tmp_path, capsys, monkeypatch):
    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "data", "--run", "run", "--quiet"] + tiny_options(epochs=1)) == 0
    saved = config_module.read_run_config(tmp_path / "run")
    assert saved.data == str((tmp_path / "data").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert main(["train", "--run", str(tmp_path / "run"), "--resume", "--quiet", "--epochs", "2"]) == 0
    # the same folder, spelled relative to this directory, is not a change of data
    assert main(["train", "--run", str(tmp_path / "run"), "--resume", "--quiet", "--epochs", "3",
                 "--data", "../data"]) == 0
    assert config_module.read_run_config(tmp_path / "run").data == saved.data


def test_a_run_that_saved_a_relative_data_folder_still_resumes_from_there(data_dir, tmp_path, capsys, monkeypatch):
    shutil.copytree(data_dir, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "data", "--run", "run", "--quiet"] + tiny_options(epochs=1)) == 0
    config_file = tmp_path / "run" / "config.yaml"
    config_file.write_text(config_file.read_text().replace(str((tmp_path / "data").resolve()), "data"))
    assert config_module.read_run_config(tmp_path / "run").data == "data"  # as written before
    assert main(["evaluate", "--run", "run", "--device", "cpu"]) == 0
    assert main(["train", "--run", "run", "--resume", "--quiet", "--epochs", "2"]) == 0


def test_evaluate_on_other_data_checks_the_catalogue_both_ways(run_dir, tmp_path, capsys):
    smaller = make_tiny_synthetic(tmp_path / "smaller")
    (smaller / "train.txt").write_text("1 2 3\n")
    (smaller / "stats.json").unlink()
    fails(["evaluate", "--run", str(run_dir), "--data", str(smaller)], capsys, "ranks 150 items, but")
    from dsan.data import prepare

    prepare("synthetic", tmp_path / "larger", synthetic_sessions=1200, synthetic_items=300)
    fails(["evaluate", "--run", str(run_dir), "--data", str(tmp_path / "larger")], capsys, "ranks 150 items, but")


def test_ctrl_c_saves_as_at_an_epoch_boundary_and_resume_continues(data_dir, tmp_path, capsys, monkeypatch):
    straight = train_tiny(data_dir, tmp_path / "straight", epochs=2)
    seen = {"epoch": 0, "batches": 0}
    real_epoch, real_loss = Trainer.train_epoch, DSAN.loss

    def train_epoch(self, epoch):
        seen.update(epoch=epoch, batches=0)
        return real_epoch(self, epoch)

    def loss_until_the_third_batch_of_epoch_2(scores, targets, reduction="mean"):
        seen["batches"] += 1
        if seen["epoch"] == 2 and seen["batches"] == 3:
            raise KeyboardInterrupt  # as Python raises it when Ctrl-C arrives
        return real_loss(scores, targets, reduction)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(DSAN, "loss", staticmethod(loss_until_the_third_batch_of_epoch_2))
    run = tmp_path / "run"
    argv = ["train", "--data", str(data_dir), "--run", str(run), "--quiet"] + tiny_options(epochs=2)
    assert main(argv) == INTERRUPTED_STATUS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"interrupted in epoch 2 of {run}; it is saved after epoch 1: dsan train --run {run} --resume continues" in err
    assert not list(run.glob(".*tmp*"))
    monkeypatch.setattr(DSAN, "loss", staticmethod(real_loss))
    assert main(argv + ["--resume"]) == 0
    resumed = json.loads((run / "test_metrics.json").read_text())
    assert resumed["test"] == straight["test"]


def test_pop_baseline_on_retailrocket_counts_every_test_sample(capsys):
    assert main(["evaluate", "--model", "pop", "--data", str(require(RETAILROCKET))]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["samples"] == 15_132
    assert 0 < metrics["hr@20"] < 0.2  # popularity is a weak recommender on this catalogue


def test_ctrl_c_while_the_command_line_loads_is_one_line(monkeypatch, capsys):
    """The `dsan` command imports torch before any command runs; Ctrl-C there is one line too."""
    import dsan.__main__ as entry

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(entry, "_load_main", interrupted)
    assert entry.run() == INTERRUPTED_STATUS
    assert capsys.readouterr().err.splitlines() == ["dsan: interrupted"]
