"""Command line: dsan prepare | train | evaluate | explain | tune | demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from . import config as config_module
from .model import ATTENTION_CHOICES

DEMO_EPOCHS = 4


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Training options default to None so that only the ones given override the config."""
    d = config_module.DEFAULTS
    parser.add_argument("--epochs", type=int, help=f"maximum epochs (default {d['epochs']})")
    parser.add_argument("--batch-size", type=int, help=f"global batch size (default {d['batch_size']})")
    parser.add_argument("--eval-batch-size", type=int, help=f"(default {d['eval_batch_size']})")
    parser.add_argument("--lr", type=float, help=f"Adam (amsgrad) learning rate (default {d['lr']})")
    parser.add_argument("--dropout", type=float, help=f"(default {d['dropout']})")
    parser.add_argument("--wk", type=float, help=f"normalised weight of the cosine scores (default {d['wk']})")
    parser.add_argument("--embedding-dim", type=int, help=f"item embedding size (default {d['embedding_dim']})")
    parser.add_argument("--attention", help=f"{' | '.join(ATTENTION_CHOICES)} (default {d['attention']})")
    parser.add_argument("--patience", type=int, help=f"early-stopping patience in epochs (default {d['patience']})")
    parser.add_argument("--seed", type=int, help=f"(default {d['seed']})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(default auto: CUDA when available)")
    parser.add_argument("--valid-fraction", type=float,
                        help="latest fraction of training sessions held out for validation; 0 = no selection: "
                             f"train on all sessions for --epochs epochs and test the last (default {d['valid_fraction']})")
    parser.add_argument("--refit", action="store_const", const=True,
                        help="after validation selects epoch E (early stopping as usual), retrain from scratch on "
                             "all training sessions for E epochs and test only that model (in RUN/refit)")
    parser.add_argument("--bucket-pool", type=int,
                        help=f"sort each pool of N shuffled batches by length (less padding); 0 = plain random "
                             f"batches (default {d['bucket_pool']})")
    parser.add_argument("--selection-metric", help=f"validation metric for early stopping and the checkpoint "
                                                   f"(default {d['selection_metric']})")
    parser.add_argument("--select-on-test", action="store_const", const=True,
                        help="ORIGINAL PROTOCOL, optimistic: train on all training sessions and pick the epoch "
                             "with the best TEST metric")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    parser.add_argument("--max-minutes", type=float,
                        help="wall-clock budget: stop before an epoch that would overrun it, then test "
                             "(--resume continues later)")
    parser.add_argument("--max-train-batches", type=int, help="debug/timing: only the first N batches per epoch")
    parser.add_argument("--max-eval-batches", type=int, help="debug/timing: only the first N evaluation batches")
    parser.add_argument("--config", help="YAML or JSON file of options (defaults < file < command line)")


def _training_overrides(args) -> dict:
    return {key: getattr(args, key) for key in config_module.DEFAULTS if key not in ("run",) and hasattr(args, key)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsan", description="DSAN session-based recommender (AAAI 2021)")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="raw logs -> session text (train.txt, test.txt, stats.json)")
    prepare.add_argument("dataset", choices=["diginetica", "retailrocket", "synthetic"])
    prepare.add_argument("--raw", help="diginetica: train-item-views.csv; retailrocket: events.csv "
                                       "(or the sessionized TSV sample)")
    prepare.add_argument("--out", required=True, help="output data folder")
    prepare.add_argument("--protocol", choices=["dsan", "srgnn"], default="dsan",
                         help="dsan: min prefix 2 (the paper); srgnn: min prefix 1")
    prepare.add_argument("--unsorted", action="store_true",
                         help="diginetica: keep file order inside sessions (reproduces the paper's old, wrong order)")
    prepare.add_argument("--seed", type=int, default=1, help="synthetic: generator seed")
    prepare.add_argument("--sessions", type=int, default=6000, help="synthetic: number of sessions")
    prepare.add_argument("--items", type=int, default=400, help="synthetic: number of items")

    train = commands.add_parser("train", help="train DSAN")
    train.add_argument("--data", help="data folder with train.txt and test.txt")
    train.add_argument("--run", "--run-dir", dest="run", required=True,
                       help="run directory (checkpoints, metrics, config); under torchrun spell it --run-dir "
                            "(torchrun reads --run as an abbreviation of its own --run-path)")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run in --run")
    train.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stdout")
    _add_training_options(train)

    evaluate = commands.add_parser("evaluate", help="HR/MRR/NDCG@5/10/20 with full ranking")
    evaluate.add_argument("--run", help="run directory (for --model dsan)")
    evaluate.add_argument("--model", choices=["dsan", "pop"], default="dsan",
                          help="pop: most-popular baseline from the training clicks (needs --data, no --run)")
    evaluate.add_argument("--data", help="data folder (default: the run's)")
    evaluate.add_argument("--split", choices=["test", "valid"], default="test")
    evaluate.add_argument("--checkpoint", choices=["best", "last"], default="best")
    evaluate.add_argument("--attention", help="evaluate with another normaliser (same weights)")
    evaluate.add_argument("--valid-fraction", type=float, help="for --model pop --split valid (default 0.1)")
    evaluate.add_argument("--batch-size", type=int, default=512)
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    explain = commands.add_parser("explain", help="heat maps of one test session's attention (PNG)")
    explain.add_argument("--run", required=True)
    explain.add_argument("--test-index", type=int, required=True, help="index into the prefix-expanded test set")
    explain.add_argument("--out", required=True, help="PNG path")
    explain.add_argument("--data", help="data folder (default: the run's)")
    explain.add_argument("--attention", help="the learned side's normaliser (default: the run's)")
    explain.add_argument("--compare-with", default="softmax")

    tune = commands.add_parser("tune", help="grid search of the technical appendix, selected on validation")
    tune.add_argument("--data", required=True)
    tune.add_argument("--out", required=True, help="folder for runs/, results.csv, results.md")
    tune.add_argument("--grid", choices=["appendix"], default="appendix")
    tune.add_argument("--subset", help="e.g. 'lr=0.001,0.003;dropout=0.5;wk=10,20' (others: the full grid)")
    tune.add_argument("--epochs", type=int)
    tune.add_argument("--patience", type=int)
    tune.add_argument("--batch-size", type=int)
    tune.add_argument("--attention")
    tune.add_argument("--device", choices=["auto", "cpu", "cuda"])
    tune.add_argument("--max-train-batches", type=int)
    tune.add_argument("--max-eval-batches", type=int)
    tune.add_argument("--verbose", action="store_true", help="show each run's log lines")

    demo = commands.add_parser("demo", help="synthetic data -> train -> evaluate -> heat map, in minutes on CPU")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS)
    demo.add_argument("--attention", help="default: adaptive-entmax if entmax_cuda is built, else entmax-reference")
    demo.add_argument("--sessions", type=int, default=6000, help="synthetic sessions")
    demo.add_argument("--items", type=int, default=400, help="synthetic items")
    return parser


def cmd_prepare(args) -> None:
    from .data import prepare

    stats = prepare(args.dataset, args.out, raw=args.raw, protocol=args.protocol, unsorted=args.unsorted,
                    seed=args.seed, synthetic_sessions=args.sessions, synthetic_items=args.items)
    print(f"wrote {args.out}: {stats['n_items']} items, train {stats['train']['sessions']} sessions / "
          f"{stats['train']['samples']} samples, test {stats['test']['sessions']} sessions / "
          f"{stats['test']['samples']} samples ({stats['protocol']} protocol)")


def cmd_train(args) -> dict:
    from .train import resolve_run_config, train

    config = resolve_run_config(args.run, args.config, _training_overrides(args), resume=args.resume)
    return train(config, resume=args.resume, quiet=args.quiet)


def evaluate_command(args) -> dict:
    import torch

    from .data import PrefixSamples, SessionData
    from .evaluate import evaluate_model, evaluate_popularity

    if args.model == "pop":
        if not args.data:
            raise SystemExit("dsan evaluate --model pop: --data DIR is required")
        data = SessionData.load(args.data)
        valid_fraction = args.valid_fraction
        if valid_fraction is None:
            valid_fraction = config_module.DEFAULTS["valid_fraction"]
        train_sessions, valid_sessions = data.split_validation(valid_fraction)
        if args.split == "test":
            train_sessions, evaluated = data.train_sessions, data.test_sessions
        else:
            evaluated = valid_sessions
        mp = data.protocol.min_prefix
        return evaluate_popularity(PrefixSamples(train_sessions, mp), PrefixSamples(evaluated, mp), data.n_items,
                                   args.batch_size)
    if not args.run:
        raise SystemExit("dsan evaluate: --run RUNDIR is required (or --model pop --data DIR)")
    from .checkpoint import load_model

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    config = yaml.safe_load((Path(args.run) / "config.yaml").read_text())
    model, _ = load_model(args.run, args.checkpoint, attention=args.attention)
    model.to(device)
    data = SessionData.load(args.data or config["data"])
    if args.split == "test":
        sessions = data.test_sessions
    else:
        if config.get("select_on_test"):
            raise SystemExit(f"{args.run} was trained with --select-on-test: it has no validation split")
        if not config.get("valid_fraction"):
            raise SystemExit(f"{args.run} was trained with --valid-fraction 0: it has no validation split")
        sessions = data.split_validation(config["valid_fraction"])[1]
    return evaluate_model(model, PrefixSamples(sessions, data.protocol.min_prefix), args.batch_size, device)


def print_metrics(title: str, metrics: dict) -> None:
    print(title)
    print("  " + "  ".join(f"{k:>8}" for k in ("K", "HR@K", "MRR@K", "NDCG@K")))
    for k in (5, 10, 20):
        print("  " + "  ".join([f"{k:>8}"] + [f"{metrics[f'{m}@{k}']:>8.4f}" for m in ("hr", "mrr", "ndcg")]))
    print(f"  ({metrics['samples']} samples)")


def cmd_explain(args) -> None:
    from .explain import explain

    result = explain(args.run, args.test_index, args.out, args.data, args.attention, args.compare_with)
    print(json.dumps(result, indent=2))


def cmd_tune(args) -> None:
    from .tune import parse_subset, tune

    overrides = {k: getattr(args, k) for k in ("epochs", "patience", "batch_size", "attention", "device",
                                               "max_train_batches", "max_eval_batches")}
    tune(args.data, args.out, parse_subset(args.subset), overrides, quiet=not args.verbose)
    print(Path(args.out, "results.md").read_text())


def default_attention() -> str:
    try:
        import entmax_cuda  # noqa: F401

        return "adaptive-entmax"
    except Exception as e:  # not built, or built for another torch: the reference computes the same
        print(f"note: entmax_cuda is not usable ({type(e).__name__}: {e}); the demo uses the pure-PyTorch "
              "reference (--attention entmax-reference)", file=sys.stderr)
        return "entmax-reference"


def cmd_demo(args) -> None:
    from .data import prepare
    from .explain import explain
    from .train import resolve_run_config, train

    started = time.time()
    out = Path(args.out)
    data_dir, run_dir = out / "data", out / "run"
    attention = args.attention or default_attention()
    stats = prepare("synthetic", data_dir, synthetic_sessions=args.sessions, synthetic_items=args.items)
    print(f"[1/4] synthetic data in {data_dir}: {stats['n_items']} items, "
          f"{stats['train']['samples']} training / {stats['test']['samples']} test samples")
    resume = (run_dir / "last.pt").exists()
    config = resolve_run_config(run_dir, overrides={"data": str(data_dir), "epochs": args.epochs,
                                                    "batch_size": 128, "attention": attention}, resume=resume)
    print(f"[2/4] training {args.epochs} epochs ({attention}) in {run_dir}")
    summary = train(config, resume=resume)
    if "test" not in summary:  # an earlier demo run already finished
        summary = json.loads((run_dir / "test_metrics.json").read_text())
    pop_args = argparse.Namespace(model="pop", data=str(data_dir), split="test", valid_fraction=None, batch_size=512)
    pop = evaluate_command(pop_args)
    print("[3/4] evaluation")
    print_metrics(f"DSAN ({attention}), epoch {summary['selected_epoch']} selected on validation, test set:",
                  summary["test"])
    print_metrics("most-popular baseline, test set:", pop)
    figure = out / "attention.png"
    result = explain(run_dir, 0, figure)
    alphas = result["panels"][attention]
    print(f"[4/4] heat map {figure} (alpha_1 {alphas['alpha_self']:.4f}, alpha_2 {alphas['alpha_target']:.4f})")
    print(f"demo done in {time.time() - started:.0f}s")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data import DataError
    from .model import AttentionUnavailable
    from .train import RunError

    try:
        if args.command == "prepare":
            cmd_prepare(args)
        elif args.command == "train":
            cmd_train(args)
        elif args.command == "evaluate":
            metrics = evaluate_command(args)
            title = (f"most-popular baseline, {args.split}" if args.model == "pop"
                     else f"{args.run} ({args.checkpoint} checkpoint), {args.split}")
            print_metrics(title, metrics)
            print(json.dumps(metrics))
        elif args.command == "explain":
            cmd_explain(args)
        elif args.command == "tune":
            cmd_tune(args)
        elif args.command == "demo":
            cmd_demo(args)
    except (DataError, ConfigError, RunError, AttentionUnavailable, FileNotFoundError, IndexError, ValueError) as e:
        print(f"dsan {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
