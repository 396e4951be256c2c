import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from testing import TINY_TRAINING, subprocess_env, tiny_config, train_tiny
from dsan.checkpoint import load_checkpoint
from dsan.cli import main
from dsan.train import RunError, train


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("dsan-run") / "run"
    summary = train_tiny(data_dir, run, epochs=3)
    return run, summary


def epoch_records(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in records]


def test_run_directory_holds_config_metrics_and_checkpoints(trained_run):
    run, summary = trained_run
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "test_metrics.json", "train.log"):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["batch_size"] == TINY_TRAINING["batch_size"] and config["dropout"] == 0.5  # a default
    records = epoch_records(run)
    assert [r["epoch"] for r in records[:-1]] == [1, 2, 3]
    assert records[-1]["event"] == "test" and records[-1]["selected_epoch"] == summary["selected_epoch"]
    best_epoch = max(records[:-1], key=lambda r: r["valid"]["hr@20"])["epoch"]
    assert summary["selected_epoch"] == best_epoch
    assert load_checkpoint(run / "best.pt")["epoch"] == best_epoch
    assert records[0]["train_loss"] > records[-2]["train_loss"]  # it learns


def test_dsan_beats_the_most_popular_baseline(trained_run, data_dir, capsys):
    run, summary = trained_run
    assert main(["evaluate", "--model", "pop", "--data", str(data_dir)]) == 0
    pop = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test"]["hr@20"] > pop["hr@20"] + 0.1


def test_evaluate_command_reproduces_the_test_metrics_of_training(trained_run, capsys):
    run, summary = trained_run
    assert main(["evaluate", "--run", str(run), "--split", "test", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name, value in summary["test"].items():
        assert metrics[name] == pytest.approx(value, rel=1e-9), name


def test_training_is_reproducible_and_resume_gives_the_same_result(data_dir, tmp_path):
    straight = tmp_path / "straight"
    train_tiny(data_dir, straight, epochs=2)
    interrupted = tmp_path / "interrupted"
    train_tiny(data_dir, interrupted, epochs=1)
    with pytest.raises(RunError, match="--resume"):
        tiny_config(data_dir, interrupted, epochs=2)
    train_tiny(data_dir, interrupted, resume=True, epochs=2)
    # the resumed run drops the first run's test record and ends with its own
    assert epoch_records(straight) == epoch_records(interrupted)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_select_on_test_is_labelled_and_trains_on_all_sessions(data_dir, tmp_path):
    summary = train_tiny(data_dir, tmp_path / "run", epochs=1, selection="test")
    assert "TEST set" in summary["selection"]
    assert "valid" not in summary and summary["test"] is not None
    assert "selection on the TEST set" in (tmp_path / "run" / "train.log").read_text()


def test_early_stopping_stops_after_patience_epochs_without_improvement(data_dir, tmp_path):
    summary = train_tiny(data_dir, tmp_path / "run", epochs=6, lr=1e-9, patience=1)
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["selected_epoch"] == 1


def test_cli_reports_a_missing_data_folder(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--run", str(tmp_path / "run"), "--quiet"]) == 2
    assert "nope: no such data folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


# `dsan train` under torchrun, then each rank lists its threads: the gloo group's worker
# threads must be gone before the interpreter shuts down (a worker still holding a collective's
# tensors then aborts the process: "terminate called without an active exception").
TRAIN_THEN_LIST_THREADS = """
import os, sys
from pathlib import Path
from dsan.cli import main
code = main(sys.argv[1:])
if Path("/proc/self/task").is_dir():  # Linux names its threads there
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    Path(f"threads.{os.environ['RANK']}").write_text("\\n".join(names))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun_match_single_process_evaluation(data_dir, tmp_path):
    run = tmp_path / "ddp"
    env = subprocess_env()
    script = tmp_path / "train_then_list_threads.py"
    script.write_text(TRAIN_THEN_LIST_THREADS)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), "train", "--data", str(data_dir), "--run-dir", str(run), "--quiet"]
    for name, value in dict(TINY_TRAINING, epochs=1, dropout=0).items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    if Path("/proc/self/task").is_dir():
        for rank in (0, 1):
            threads = (tmp_path / f"threads.{rank}").read_text().split()
            assert not [name for name in threads if "gloo" in name], (rank, threads)
    ddp = json.loads((run / "test_metrics.json").read_text())
    # the same checkpoint evaluated by one process
    single_eval = subprocess.run([sys.executable, "-m", "dsan", "evaluate", "--run", str(run), "--device", "cpu"],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert single_eval.returncode == 0, single_eval.stderr[-3000:]
    single = json.loads(single_eval.stdout.strip().splitlines()[-1])
    assert single["samples"] == ddp["test"]["samples"]
    for name, value in single.items():
        assert ddp["test"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    # data-parallel training with the global batch split over ranks = one process (up to float sums)
    reference = train_tiny(data_dir, tmp_path / "single", epochs=1, dropout=0.0)
    ddp_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    single_loss = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert ddp_loss == pytest.approx(single_loss, rel=1e-3)
    assert ddp["valid"]["hr@20"] == pytest.approx(reference["valid"]["hr@20"], abs=0.02)


def test_max_minutes_stops_between_epochs_and_still_tests(data_dir, tmp_path):
    summary = train_tiny(data_dir, tmp_path / "run", epochs=5, max_minutes=1e-6)
    assert summary["epochs_run"] == 1 and not summary["stopped_early"]
    assert summary["test"]["samples"] > 0


def test_a_slice_of_retailrocket_trains_with_the_paper_model(tmp_path):
    from testing import RETAILROCKET, require

    config = tiny_config(require(RETAILROCKET), tmp_path / "run", epochs=1, embedding_dim=100, batch_size=512,
                         eval_batch_size=512, lr=1e-3, max_train_batches=2, max_eval_batches=1,
                         attention="entmax-reference")
    summary = train(config, tmp_path / "run", quiet=True)
    assert summary["valid"]["samples"] == 512 and summary["test"]["samples"] == 512
    assert load_checkpoint(tmp_path / "run" / "best.pt")["model_args"]["n_items"] == 36968


def model_tensors(path):
    return load_checkpoint(path)["model"]


def test_valid_fraction_zero_trains_exactly_the_epochs_on_all_sessions_and_tests_the_last(data_dir, tmp_path):
    summary = train_tiny(data_dir, tmp_path / "all", epochs=2, selection="none")
    assert summary["selected_epoch"] == 2 and summary["epochs_run"] == 2 and "valid" not in summary
    assert "no selection" in summary["selection"]
    records = epoch_records(tmp_path / "all")
    assert [r.get("epoch") for r in records] == [1, 2, None] and "valid" not in records[0]
    # the same training trajectory as the original protocol's run, which sees the test set every epoch
    train_tiny(data_dir, tmp_path / "on-test", epochs=2, selection="test", patience=5)
    on_test = epoch_records(tmp_path / "on-test")
    assert summary["test"] == on_test[1]["test"]
    a, b = model_tensors(tmp_path / "all" / "last.pt"), model_tensors(tmp_path / "on-test" / "last.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_refit_retrains_on_all_sessions_for_the_epoch_count_selected_on_validation(data_dir, tmp_path):
    run = tmp_path / "refit-run"
    summary = train_tiny(data_dir, run, epochs=3, refit=True)
    selection = epoch_records(run)
    assert all("test" not in r for r in selection)  # the selection phase never looks at the test set
    best = max(selection, key=lambda r: r["valid"]["hr@20"])["epoch"]
    assert summary["selected_epoch"] == best and summary["valid"]["hr@20"] == selection[best - 1]["valid"]["hr@20"]
    assert "retrained on all training sessions" in summary["selection"]
    refit_records = epoch_records(run / "refit")
    assert [r.get("epoch") for r in refit_records] == list(range(1, best + 1)) + [None]
    assert json.loads((run / "test_metrics.json").read_text())["test"] == summary["test"]
    # what --refit reports is exactly a fresh all-sessions run of that many epochs
    direct = train_tiny(data_dir, tmp_path / "direct", epochs=best, selection="none")
    assert direct["test"] == summary["test"]


def test_evaluate_refuses_the_validation_split_of_a_run_without_one(data_dir, tmp_path, capsys):
    train_tiny(data_dir, tmp_path / "all", epochs=1, selection="none")
    assert main(["evaluate", "--run", str(tmp_path / "all"), "--split", "valid", "--device", "cpu"]) == 2
    assert "was trained with selection none: it has no validation split" in capsys.readouterr().err


def test_refit_waits_for_a_selection_phase_cut_short_by_the_budget_and_resume_finishes_it(data_dir, tmp_path):
    run = tmp_path / "budget"
    cut = train_tiny(data_dir, run, epochs=3, refit=True, max_minutes=1e-6)
    assert cut["epochs_run"] == 1 and not (run / "refit").exists()
    assert "refit not started" in (run / "train.log").read_text()
    resumed = train_tiny(data_dir, run, resume=True, epochs=3, max_minutes=1000)
    straight = train_tiny(data_dir, tmp_path / "straight", epochs=3, refit=True)
    assert resumed["selected_epoch"] == straight["selected_epoch"] and resumed["test"] == straight["test"]
