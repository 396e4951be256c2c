"""Training loop: Adam (amsgrad), early stopping on validation, atomic checkpoints, resume, DDP.

A run directory holds config.yaml (the resolved configuration), metrics.jsonl (one record
per epoch, then one for the test), train.log, best.pt (the selected checkpoint), last.pt
(everything needed to resume) and test_metrics.json.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from . import config as config_module
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .data import PrefixSamples, SessionData, batch_index_lists
from .evaluate import evaluate_model, format_metrics
from .model import DSAN


class RunError(RuntimeError):
    pass


def resolve_run_config(run_dir, config_file=None, overrides=None, resume=False) -> dict:
    """For a new run: defaults < file < command line. For --resume: the run's saved
    config < file < command line (so e.g. --epochs can be raised)."""
    run_dir = Path(run_dir)
    base = None
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise RunError(f"--resume: {saved} not found (is {run_dir} a run directory?)")
        base = dict(config_module.DEFAULTS, **yaml.safe_load(saved.read_text()))
    elif (run_dir / "last.pt").exists():
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run")
    config = config_module.resolve(config_file, overrides, base=base)
    config["run"] = str(run_dir)
    if not config.get("data"):
        raise RunError("--data DIR is required (a folder with train.txt and test.txt)")
    return config


def setup_distributed(device_option: str):
    """(rank, world_size, device). Under torchrun: gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_option == "cuda" or (device_option == "auto" and torch.cuda.is_available())
    if device_option == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # torch._dynamo, first imported by the optimizer or DDP, keeps references to a process
        # group that exists when it is imported (torch 2.14): destroy_process_group then cannot
        # free the gloo group, whose worker threads outlive it and can abort the interpreter at
        # exit ("terminate called without an active exception"). Imported first, it holds none.
        importlib.import_module("torch._dynamo")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Every epoch reseeds from (seed, epoch): a resumed run draws the same numbers."""
    return seed * 1_000_003 + epoch * 101 + rank


class TrainingLog:
    def __init__(self, run_dir: Path, active: bool, quiet: bool):
        self.path = run_dir / "train.log"
        self.active = active
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.active:
            return
        if not self.quiet:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _rewrite_metrics(path: Path, last_epoch: int) -> None:
    """Drop records an interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", math.inf) <= last_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: dict, resume: bool = False, quiet: bool = False, evaluate_test: bool = True) -> dict:
    """Trains (and tests) one run; under torchrun every process calls it.

    With config["refit"]: the run selects epoch E on validation as usual (without looking at
    the test set), then RUN/refit trains from scratch on all training sessions for E epochs
    and only that model is tested."""
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        if not config.get("refit"):
            return _train(config, resume, quiet, evaluate_test)
        return _train_with_refit(config, resume, quiet, evaluate_test)
    finally:
        # A process that exits with its gloo/nccl group alive can abort in the group's
        # threads ("terminate called without an active exception"): close it first.
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train_with_refit(config: dict, resume: bool, quiet: bool, evaluate_test: bool) -> dict:
    selection = _train(config, resume, quiet, evaluate_test=False)
    is_main = int(os.environ.get("RANK", "0")) == 0
    log = TrainingLog(Path(config["run"]), is_main, quiet)
    finished = selection["stopped_early"] or selection["epochs_run"] >= config["epochs"]
    if not finished:
        log("refit not started: the selection phase hit --max-minutes before early stopping (--resume continues it)")
        return selection
    refit_dir = Path(config["run"]) / "refit"
    refit_config = dict(config, run=str(refit_dir), refit=False, valid_fraction=0.0,
                        epochs=selection["selected_epoch"])
    log(f"refit: epoch {selection['selected_epoch']} was selected on validation; training from scratch on all "
        f"training sessions for {selection['selected_epoch']} epochs in {refit_dir}")
    refit_resume = resume and (refit_dir / "last.pt").exists()
    if refit_dir.exists() and not refit_resume and is_main:
        for name in ("metrics.jsonl", "test_metrics.json", "train.log", "best.pt"):
            (refit_dir / name).unlink(missing_ok=True)
    refit = _train(refit_config, refit_resume, quiet, evaluate_test)
    summary = dict(refit, selection=f"epoch count selected on validation {config['selection_metric']}, "
                                    "then retrained on all training sessions",
                   valid=selection["valid"], selection_epochs_run=selection["epochs_run"],
                   selection_stopped_early=selection["stopped_early"])
    if evaluate_test and is_main:
        atomic_write_text(Path(config["run"]) / "test_metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train(config: dict, resume: bool, quiet: bool, evaluate_test: bool) -> dict:
    """Trains per `config` (see config.DEFAULTS); returns a summary with the selected epoch
    and its validation (and, if evaluate_test, test) metrics."""
    rank, world, device = setup_distributed(config["device"])
    is_main = rank == 0
    threads = config["threads"] or (max(1, (os.cpu_count() or 1) // world) if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(config["run"])
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_module.save_config(config, run_dir)
    log = TrainingLog(run_dir, is_main, quiet)
    metrics_path = run_dir / "metrics.jsonl"

    data = SessionData.load(config["data"])
    min_prefix = data.protocol.min_prefix
    selecting = config["select_on_test"] or config["valid_fraction"] > 0
    if config["select_on_test"]:
        # the original protocol: all training sessions train, the epoch is picked on the test set
        train_sessions, selection_sessions, selection_split = data.train_sessions, data.test_sessions, "test"
    elif selecting:
        train_sessions, selection_sessions = data.split_validation(config["valid_fraction"])
        selection_split = "valid"
    else:
        # no selection: all training sessions, exactly --epochs epochs, the last one is the result
        train_sessions, selection_sessions, selection_split = data.train_sessions, [], None
    train_samples = PrefixSamples(train_sessions, min_prefix)
    selection_samples = PrefixSamples(selection_sessions, min_prefix)
    test_samples = PrefixSamples(data.test_sessions, min_prefix)
    if len(train_samples) == 0 or (selecting and len(selection_samples) == 0):
        raise RunError(f"{config['data']}: {len(train_samples)} training and {len(selection_samples)} "
                       f"{selection_split} samples; both must be > 0")

    torch.manual_seed(config["seed"])
    model = DSAN(data.n_items, data.longest_session, config["embedding_dim"], config["dropout"],
                 config["wk"], config["attention"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], amsgrad=True)
    state = {"epoch": 0, "best_epoch": None, "best_metric": -math.inf, "best_metrics": None,
             "epochs_without_improvement": 0, "stopped_early": False}
    if resume and (run_dir / "last.pt").exists():
        checkpoint = load_checkpoint(run_dir / "last.pt", map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state.update(checkpoint["state"])
        if is_main:
            _rewrite_metrics(metrics_path, state["epoch"])
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not model.uses_learned_alpha)
    if config["select_on_test"]:
        selection_label = "selection on the TEST set (original protocol: optimistic, not a clean estimate)"
    elif selecting:
        selection_label = f"selection on validation {config['selection_metric']}"
    else:
        selection_label = f"no selection: the last of {config['epochs']} epochs on all training sessions"
    if state["epoch"] == 0:
        log(f"dsan train: {len(train_samples)} training samples, "
            + (f"{len(selection_samples)} {selection_split} samples, " if selecting else "")
            + f"{data.n_items} items, attention {config['attention']}, device {device}, "
            f"{world} process(es); {selection_label}")

    progress_enabled = is_main and not quiet and sys.stderr.isatty()
    run_started = time.time()
    metric = config["selection_metric"]
    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        if state["stopped_early"]:
            break
        torch.manual_seed(epoch_seed(config["seed"], epoch, rank))
        batches = batch_index_lists(len(train_samples), config["batch_size"], shuffle=True,
                                    seed=epoch_seed(config["seed"], epoch),
                                    lengths=train_samples.prefix_length, bucket_pool=config["bucket_pool"])
        if config["max_train_batches"]:
            batches = batches[:config["max_train_batches"]]
        batches = [b for b in batches if len(b) >= world]  # every rank needs a share
        model.train()
        loss_sum, sample_count = torch.zeros((), dtype=torch.float64), 0
        started = time.time()
        bar = None
        progress_every = max(1, len(batches) // 10)
        if progress_enabled:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True)
        for step, indices in enumerate(batches, 1):
            if world > 1:  # every rank caps the rows of the whole batch: replicas stay identical
                global_items, global_lengths, _ = train_samples.batch(indices)
                model.renormalise_embeddings(global_items, global_lengths)
            items, lengths, targets = train_samples.batch(np.array_split(indices, world)[rank])
            items, lengths, targets = items.to(device), lengths.to(device), targets.to(device)
            # sum / global batch size, times world because DDP averages the ranks' gradients
            scores = ddp_model(items, lengths)
            loss = torch.nn.functional.cross_entropy(scores, targets - 1, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            (loss * world / len(indices)).backward()
            optimizer.step()
            loss_sum += loss.detach().double().cpu()
            sample_count += len(targets)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == len(batches):
                    elapsed = time.time() - started
                    bar.set_postfix(loss=f"{loss_sum.item() / sample_count:.4f}",
                                    samples_per_s=f"{sample_count * world / elapsed:.0f}")
            elif step % progress_every == 0 and step < len(batches) and time.time() - started > 30:
                # no TTY (a log file) and a slow epoch: a line per 10%
                elapsed = time.time() - started
                log(f"  epoch {epoch}: {step}/{len(batches)} batches, loss {loss_sum.item() / sample_count:.4f}, "
                    f"{sample_count * world / elapsed:.0f} samples/s")
        if bar is not None:
            bar.close()
        if world > 1:
            totals = torch.tensor([loss_sum.item(), float(sample_count)], dtype=torch.float64,
                                  device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(totals)
            loss_sum, sample_count = totals[0].cpu(), int(totals[1].item())
        train_time = time.time() - started
        train_loss = loss_sum.item() / max(sample_count, 1)

        started = time.time()
        selection_metrics = None
        if selecting:
            selection_metrics = evaluate_model(model, selection_samples, config["eval_batch_size"], device,
                                               config["max_eval_batches"])
        eval_time = time.time() - started
        improved = not selecting or selection_metrics[metric] > state["best_metric"]
        if improved:
            state.update(best_epoch=epoch, best_metric=selection_metrics[metric] if selecting else -math.inf,
                         best_metrics=selection_metrics, epochs_without_improvement=0)
        else:
            state["epochs_without_improvement"] += 1
        state["epoch"] = epoch
        state["stopped_early"] = state["epochs_without_improvement"] >= config["patience"]
        if is_main:
            model_args = model.model_args()
            if improved:
                save_checkpoint({"model": model.state_dict(), "model_args": model_args, "epoch": epoch,
                                 "metrics": selection_metrics, "selection_split": selection_split}, run_dir / "best.pt")
            record = {"epoch": epoch, "train_loss": train_loss, "train_time_s": train_time,
                      "train_samples_per_s": sample_count / max(train_time, 1e-9), "eval_time_s": eval_time,
                      "best": improved}
            if selecting:
                record[selection_split] = selection_metrics
            _append_metrics(metrics_path, record)
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "model_args": model_args, "state": state}, run_dir / "last.pt")
        if world > 1:
            dist.barrier()
        log(f"epoch {epoch} train [time {train_time:.1f}s, {sample_count / max(train_time, 1e-9):.0f} samples/s, "
            f"loss {train_loss:.4f}]"
            + (f" {selection_split} [time {eval_time:.1f}s, {format_metrics(selection_metrics)}]"
               + (" *" if improved else "") if selecting else ""))
        if state["stopped_early"]:
            log(f"early stopping: no {selection_split} {metric} improvement for {config['patience']} epochs")
        elif config["max_minutes"] and epoch < config["epochs"]:
            elapsed = time.time() - run_started
            if elapsed + (train_time + eval_time) > 60 * config["max_minutes"]:
                log(f"stopping after epoch {epoch}: the next epoch would overrun --max-minutes "
                    f"{config['max_minutes']} (--resume continues)")
                break

    summary = {"selected_epoch": state["best_epoch"], "selection": selection_label,
               "epochs_run": state["epoch"], "stopped_early": state["stopped_early"]}
    if selecting:
        summary[selection_split] = state["best_metrics"]
    if evaluate_test:
        best = load_checkpoint(run_dir / "best.pt", map_location=device)
        model.load_state_dict(best["model"])
        test_metrics = evaluate_model(model, test_samples, config["eval_batch_size"], device,
                                      config["max_eval_batches"])
        summary["test"] = test_metrics
        if is_main:
            _append_metrics(metrics_path, {"event": "test", "selected_epoch": state["best_epoch"],
                                           "selection": selection_label, "test": test_metrics})
            atomic_write_text(run_dir / "test_metrics.json", json.dumps(summary, indent=2) + "\n")
        log(f"test (epoch {state['best_epoch']}, {selection_label}): "
            + format_metrics(test_metrics, ("hr@5", "mrr@5", "hr@10", "mrr@10", "hr@20", "mrr@20")))
    if world > 1:
        dist.barrier()
    return summary
