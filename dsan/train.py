"""Training: a Trainer (fit / train_epoch / validate / save / resume), early stopping on the
selection split, atomic checkpoints, resume (after a crash, kill -9 or Ctrl-C), data-parallel
under torchrun.

A run directory holds config.yaml (the resolved RunConfig), metrics.jsonl (one record per
epoch, then one for the test), train.log, best.pt (the selected checkpoint), last.pt
(everything needed to resume), test_metrics.json, and with refit the refit/ run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, restore, save_checkpoint
from .config import FIELDS, RunConfig, differences, read_run_config, resolve, save_config
from .data import SessionData, batch_index_lists
from .device import setup_distributed, world_size_from_environment
from .errors import RunError, require_extra
from .evaluate import evaluate_model, format_metrics
from .files import append_line, write_atomically
from .model import DSAN

RESUMABLE = [name for name, f in FIELDS.items() if f.metadata["on_resume"]]


class TrainingInterrupted(Exception):
    """Ctrl-C during training; the message says what is saved and how to continue."""


def prepare_run(run_dir, config_file=None, overrides=None, resume: bool = False) -> RunConfig:
    """The configuration of a run, checked before anything is written. New run: defaults <
    file < command line. --resume: the saved configuration < file < command line, where only
    the RESUMABLE options may change (the data, the model and the schedule stay as saved)."""
    run_dir = Path(run_dir)
    if resume:
        saved = read_run_config(run_dir)
        config = resolve(config_file, overrides, base=saved)
        changed = [name for name in differences(saved, config) if name not in RESUMABLE
                   and not (name == "data" and Path(saved.data).resolve() == Path(config.data).resolve())]
        if changed:
            raise RunError(f"--resume continues {run_dir} as configured in its config.yaml; "
                           + ", ".join(f"{name} {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in changed)
                           + f" cannot change (only {', '.join(RESUMABLE)} can); start a new --run instead")
        return _with_absolute_data(config)
    if (run_dir / "last.pt").exists():
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run")
    config = resolve(config_file, overrides)
    if not config.data:
        raise RunError("--data DIR is required (a folder with train.txt and test.txt)")
    return _with_absolute_data(config)


def _with_absolute_data(config: RunConfig) -> RunConfig:
    """config.yaml keeps the data folder as an absolute path, so that --resume and evaluate work from
    any working directory (a relative one saved by an older run resolves against the current one)."""
    return dataclasses.replace(config, data=str(Path(config.data).resolve()))


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Every epoch reseeds from (seed, epoch): a resumed run draws the same numbers."""
    return seed * 1_000_003 + epoch * 101 + rank


class TrainingLog:
    """Lines to stdout (unless quiet) and to RUN/train.log, from the main process only."""

    def __init__(self, run_dir: Path, active: bool, quiet: bool):
        self.path = run_dir / "train.log"
        self.active = active
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        if not self.active:
            return
        if not self.quiet:
            print(line, flush=True)
        append_line(self.path, line)


def _rewrite_metrics(path: Path, last_epoch: int) -> None:
    """Drop records an interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", math.inf) <= last_epoch]
    write_atomically({path: "".join(line + "\n" for line in kept)})


class Trainer:
    """One training run. Everything the data or the configuration could get wrong is checked
    in the constructor, before the run directory is touched."""

    def __init__(self, config: RunConfig, run_dir, quiet: bool = False, evaluate_test: bool = True):
        self.config, self.run_dir, self.quiet, self.evaluate_test = config, Path(run_dir), quiet, evaluate_test
        self.rank, self.world, self.device = setup_distributed(config.device)
        self.is_main = self.rank == 0
        threads = config.threads or (max(1, (os.cpu_count() or 1) // self.world) if self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.log = TrainingLog(self.run_dir, self.is_main, quiet)
        self.metrics_path = self.run_dir / "metrics.jsonl"

        data = self.data = SessionData.load(config.data, config.protocol)
        max_length = min(data.longest_session, config.max_length)  # the model's positions
        if config.selection == "test":  # the original protocol: all sessions train, the test set selects
            train_sessions, selection_sessions = data.train_sessions, data.test_sessions
        elif config.selection == "valid":
            train_sessions, selection_sessions = data.split_validation(config.valid_fraction)
        else:
            train_sessions, selection_sessions = data.train_sessions, []
        self.train_samples = data.samples(train_sessions, max_length, "training split")
        self.selection_samples = (data.samples(selection_sessions, max_length, f"{config.selection} split")
                                  if config.selects else None)
        self.test_samples = data.samples(data.test_sessions, max_length, "test set (test.txt)")

        torch.manual_seed(config.seed)
        self.model = DSAN(data.n_items, max_length, config.embedding_dim, config.dropout, config.wk,
                          config.attention).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, amsgrad=True)
        self.state = {"epoch": 0, "best_epoch": None, "best_metric": -math.inf, "best_metrics": None,
                      "epochs_without_improvement": 0, "stopped_early": False}
        self.saved_epoch = 0  # the epoch whose last.pt is on disk
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not self.model.uses_learned_alpha)
        if config.selection == "test":
            self.selection_label = "selection on the TEST set (original protocol: optimistic, not a clean estimate)"
        elif config.selection == "valid":
            self.selection_label = f"selection on validation {config.selection_metric}"
        else:
            self.selection_label = f"no selection: the last of {config.epochs} epochs on all training sessions"

    # ------------------------------------------------------------ the steps

    def resume(self) -> None:
        """Restores model, optimiser and loop state from RUN/last.pt, if an epoch finished."""
        path = self.run_dir / "last.pt"
        if not path.exists():
            return
        checkpoint = load_checkpoint(path, map_location=self.device)
        if checkpoint.get("catalogue", self.data.catalogue) != self.data.catalogue:
            raise RunError(f"{path} was trained on other item ids than those of {self.data.directory}")
        restore(self.model, checkpoint["model"], path)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.state.update(checkpoint["state"])
            self.saved_epoch = self.state["epoch"]
        except (KeyError, ValueError, TypeError) as e:
            raise RunError(f"{path}: no resumable training state ({type(e).__name__}: {e})") from None
        if self.state["best_epoch"] is not None:  # the test loads it: a broken one fails now, not after the run changed
            best = self.run_dir / "best.pt"
            restore(self.model, load_checkpoint(best, map_location=self.device)["model"], best)
            restore(self.model, checkpoint["model"], path)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the (shuffled, length-bucketed) training samples."""
        config, model, world = self.config, self.model, self.world
        torch.manual_seed(epoch_seed(config.seed, epoch, self.rank))
        batches = batch_index_lists(len(self.train_samples), config.batch_size, shuffle=True,
                                    seed=epoch_seed(config.seed, epoch),
                                    lengths=self.train_samples.prefix_length, bucket_pool=config.bucket_pool)
        if config.max_train_batches:
            batches = batches[:config.max_train_batches]
        batches = [b for b in batches if len(b) >= world]  # every rank needs a share
        model.train()
        loss_sum, sample_count = torch.zeros((), dtype=torch.float64), 0
        started = time.time()
        bar = None
        progress_every = max(1, len(batches) // 10)
        if self.is_main and not self.quiet and sys.stderr.isatty():
            bar = require_extra("tqdm").tqdm(total=len(batches), desc=f"epoch {epoch}", unit="batch", leave=False,
                                             dynamic_ncols=True)
        for step, indices in enumerate(batches, 1):
            if world > 1:  # every rank caps the rows of the whole batch: replicas stay identical
                global_items, global_lengths, _ = self.train_samples.batch(indices)
                model.renormalise_embeddings(global_items, global_lengths)
            items, lengths, targets = self.train_samples.batch(np.array_split(indices, world)[self.rank])
            items, lengths, targets = items.to(self.device), lengths.to(self.device), targets.to(self.device)
            # sum / global batch size, times world because DDP averages the ranks' gradients
            loss = model.loss(self.ddp_model(items, lengths), targets, reduction="sum")
            self.optimizer.zero_grad(set_to_none=True)
            (loss * world / len(indices)).backward()
            self.optimizer.step()
            loss_sum += loss.detach().double().cpu()
            sample_count += len(targets)
            elapsed = time.time() - started
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == len(batches):
                    bar.set_postfix(loss=f"{loss_sum.item() / sample_count:.4f}",
                                    samples_per_s=f"{sample_count * world / elapsed:.0f}")
            elif step % progress_every == 0 and step < len(batches) and elapsed > 30:
                # no terminal (a log file) and a slow epoch: a line per 10 %
                self.log(f"  epoch {epoch}: {step}/{len(batches)} batches, loss {loss_sum.item() / sample_count:.4f}, "
                         f"{sample_count * world / elapsed:.0f} samples/s")
        if bar is not None:
            bar.close()
        if world > 1:
            totals = torch.tensor([loss_sum.item(), float(sample_count)], dtype=torch.float64,
                                  device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(totals)
            loss_sum, sample_count = totals[0].cpu(), int(totals[1].item())
        train_time = time.time() - started
        return {"train_loss": loss_sum.item() / max(sample_count, 1), "train_time_s": train_time,
                "train_samples_per_s": sample_count / max(train_time, 1e-9)}

    def validate(self) -> dict | None:
        """Metrics on the selection split (None without selection)."""
        if not self.config.selects:
            return None
        return evaluate_model(self.model, self.selection_samples, self.config.eval_batch_size, self.device,
                              self.config.max_eval_batches)

    def save(self, epoch: int, improved: bool, record: dict) -> None:
        """best.pt (if improved), the epoch's metrics record, then last.pt: after a crash the run
        resumes from the last epoch whose last.pt was written."""
        if not self.is_main:
            return
        model_args, catalogue = self.model.model_args(), self.data.catalogue
        if improved:
            save_checkpoint({"model": self.model.state_dict(), "model_args": model_args, "catalogue": catalogue,
                             "epoch": epoch,
                             "metrics": self.state["best_metrics"], "selection_split": self.split_name},
                            self.run_dir / "best.pt")
        append_line(self.metrics_path, json.dumps(record))
        save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "model_args": model_args, "catalogue": catalogue, "state": self.state},
                        self.run_dir / "last.pt")
        self.saved_epoch = epoch

    def test(self) -> dict:
        """The selected checkpoint (best.pt) on the test set."""
        path = self.run_dir / "best.pt"
        restore(self.model, load_checkpoint(path, map_location=self.device)["model"], path)
        return evaluate_model(self.model, self.test_samples, self.config.eval_batch_size, self.device,
                              self.config.max_eval_batches)

    @property
    def split_name(self):
        return {"valid": "valid", "test": "test", "none": None}[self.config.selection]

    # ------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict:
        """Trains (from last.pt if resume) until --epochs, early stopping or the time budget, then
        tests the selected checkpoint. Returns a summary with the selected epoch and its metrics."""
        config, state, log = self.config, self.state, self.log
        if resume:
            self.resume()  # before writing anything: a checkpoint that does not fit changes nothing
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.run_dir)
            if resume:
                _rewrite_metrics(self.metrics_path, state["epoch"])
            else:
                self.metrics_path.unlink(missing_ok=True)
        if state["epoch"] == 0:
            for note in self.data.notes:
                log(f"note: {note}")
            truncated = sum(samples.truncated for samples in (self.train_samples, self.selection_samples,
                                                              self.test_samples) if samples is not None)
            if truncated:
                log(f"note: {truncated} input prefixes longer than --max-length {config.max_length} keep their most "
                    "recent clicks")
            log(f"dsan train: {len(self.train_samples)} training samples, "
                + (f"{len(self.selection_samples)} {self.split_name} samples, " if config.selects else "")
                + f"{self.data.n_items} items, {self.data.protocol.name} protocol, attention {config.attention}, "
                f"device {self.device}, {self.world} process(es); {self.selection_label}")
        else:
            log(f"resuming {self.run_dir} after epoch {state['epoch']}")
        run_started = time.time()
        epoch = state["epoch"]
        try:
            for epoch in range(state["epoch"] + 1, config.epochs + 1):
                if state["stopped_early"]:
                    break
                record = {"epoch": epoch, **self.train_epoch(epoch)}
                started = time.time()
                metrics = self.validate()
                record["eval_time_s"] = time.time() - started
                improved = not config.selects or metrics[config.selection_metric] > state["best_metric"]
                if improved:
                    state.update(best_epoch=epoch, best_metric=metrics[config.selection_metric] if config.selects
                                 else -math.inf, best_metrics=metrics, epochs_without_improvement=0)
                else:
                    state["epochs_without_improvement"] += 1
                state["epoch"] = epoch
                state["stopped_early"] = state["epochs_without_improvement"] >= config.patience
                record["best"] = improved
                if config.selects:
                    record[self.split_name] = metrics
                self.save(epoch, improved, record)
                if self.world > 1:
                    dist.barrier()
                log(f"epoch {epoch} train [time {record['train_time_s']:.1f}s, {record['train_samples_per_s']:.0f} "
                    f"samples/s, loss {record['train_loss']:.4f}]"
                    + (f" {self.split_name} [time {record['eval_time_s']:.1f}s, {format_metrics(metrics)}]"
                       + (" *" if improved else "") if config.selects else ""))
                if state["stopped_early"]:
                    log(f"early stopping: no {self.split_name} {config.selection_metric} improvement for "
                        f"{config.patience} epochs")
                elif config.max_minutes and epoch < config.epochs:
                    elapsed = time.time() - run_started
                    if elapsed + record["train_time_s"] + record["eval_time_s"] > 60 * config.max_minutes:
                        log(f"stopping after epoch {epoch}: the next epoch would overrun --max-minutes "
                            f"{config.max_minutes} (--resume continues)")
                        break
            summary = {"selected_epoch": state["best_epoch"], "selection": self.selection_label,
                       "epochs_run": state["epoch"], "stopped_early": state["stopped_early"]}
            if config.selects:
                summary[self.split_name] = state["best_metrics"]
            if self.evaluate_test:
                summary["test"] = self.test()
                if self.is_main:
                    append_line(self.metrics_path, json.dumps({"event": "test", "selected_epoch": state["best_epoch"],
                                                               "selection": self.selection_label,
                                                               "test": summary["test"]}))
                    write_atomically({self.run_dir / "test_metrics.json": json.dumps(summary, indent=2) + "\n"})
                log(f"test (epoch {state['best_epoch']}, {self.selection_label}): "
                    + format_metrics(summary["test"], ("hr@5", "mrr@5", "hr@10", "mrr@10", "hr@20", "mrr@20")))
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted in epoch {epoch} of {self.run_dir}; it is saved after epoch "
                                      f"{self.saved_epoch}") from None
        if self.world > 1:
            dist.barrier()
        return summary


def train(config: RunConfig, run_dir, resume: bool = False, quiet: bool = False, evaluate_test: bool = True) -> dict:
    """Trains (and tests) one run; under torchrun every process calls it.

    With config.refit: the run selects epoch E on validation as usual (without looking at the
    test set), then RUN/refit trains from scratch on all training sessions for E epochs and
    only that model is tested."""
    owns_group = world_size_from_environment() > 1 and not dist.is_initialized()
    try:
        if not config.refit:
            return Trainer(config, run_dir, quiet, evaluate_test).fit(resume)
        return _train_with_refit(config, Path(run_dir), resume, quiet, evaluate_test)
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}: dsan train --run {run_dir} --resume continues") from None
    finally:
        # A process that exits with its gloo/nccl group alive can abort in the group's
        # threads ("terminate called without an active exception"): close it first.
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train_with_refit(config: RunConfig, run_dir: Path, resume: bool, quiet: bool, evaluate_test: bool) -> dict:
    selection = Trainer(config, run_dir, quiet, evaluate_test=False).fit(resume)
    is_main = int(os.environ.get("RANK", "0")) == 0
    log = TrainingLog(run_dir, is_main, quiet)
    finished = selection["stopped_early"] or selection["epochs_run"] >= config.epochs
    if not finished:
        log("refit not started: the selection phase hit --max-minutes before early stopping (--resume continues it)")
        return selection
    refit_dir = run_dir / "refit"
    refit_config = dataclasses.replace(config, refit=False, selection="none", epochs=selection["selected_epoch"])
    log(f"refit: epoch {selection['selected_epoch']} was selected on validation; training from scratch on all "
        f"training sessions for {selection['selected_epoch']} epochs in {refit_dir}")
    refit_resume = resume and (refit_dir / "last.pt").exists()
    if refit_dir.exists() and not refit_resume and is_main:
        for name in ("metrics.jsonl", "test_metrics.json", "train.log", "best.pt"):
            (refit_dir / name).unlink(missing_ok=True)
    refit = Trainer(refit_config, refit_dir, quiet, evaluate_test).fit(refit_resume)
    summary = dict(refit, selection=f"epoch count selected on validation {config.selection_metric}, "
                                    "then retrained on all training sessions",
                   valid=selection["valid"], selection_epochs_run=selection["epochs_run"],
                   selection_stopped_early=selection["stopped_early"])
    if evaluate_test and is_main:
        write_atomically({run_dir / "test_metrics.json": json.dumps(summary, indent=2) + "\n"})
    return summary
