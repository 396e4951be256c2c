"""Command line: dsan prepare | train | evaluate | explain | tune | demo. It parses the
arguments, calls the library, and turns a user's mistake into one line and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from . import config as config_module
from .config import DEFAULTS, PROTOCOL_NAMES, add_options, given_options
from .data import DEFAULT_PROTOCOL, SYNTHETIC_ITEMS, SYNTHETIC_SEED, SYNTHETIC_SESSIONS
from .errors import INTERRUPTED_STATUS, DsanError

EVALUATE_FLAGS = {"eval_batch_size": "--batch-size"}  # evaluate's own spelling of a RunConfig option


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)


def _command(commands, name, help, description=None):
    return commands.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsan", formatter_class=HelpFormatter,
        description="DSAN session-based recommender (Yuan et al., AAAI 2021) on the fused entmax_cuda kernels.",
        epilog="Errors in data or options end a command with one line and exit status 2; Ctrl-C with 130.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = _command(commands, "prepare", "raw logs -> session text (train.txt, test.txt, stats.json)")
    prepare.add_argument("dataset", choices=["diginetica", "retailrocket", "srgnn", "synthetic"],
                         help="the raw format (srgnn: a folder of SR-GNN-format pickles)")
    prepare.add_argument("--raw", metavar="FILE",
                         help="REQUIRED for diginetica (train-item-views.csv), retailrocket (events.csv, or the "
                              "sessionized TSV sample) and srgnn (the folder with test.txt and train.txt or "
                              "all_train_seq.txt); not used for synthetic")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output data folder (required)")
    prepare.add_argument("--protocol", choices=PROTOCOL_NAMES, default=None,
                         help="dsan: sessions >= 3 clicks, inputs >= 2 clicks (the paper); srgnn: >= 2 and >= 1 "
                              f"(default: {DEFAULT_PROTOCOL}; srgnn for the srgnn format)")
    prepare.add_argument("--unsorted", action="store_true",
                         help="diginetica: keep the file's order inside sessions, which the paper's camera-ready "
                              "numbers used (wrong; for comparison only) (default: sorted by eventdate, timeframe)")
    prepare.add_argument("--seed", type=int, default=SYNTHETIC_SEED, help="synthetic: generator seed (default: %(default)s)")
    prepare.add_argument("--sessions", type=int, default=SYNTHETIC_SESSIONS, help="synthetic: sessions (default: %(default)s)")
    prepare.add_argument("--items", type=int, default=SYNTHETIC_ITEMS, help="synthetic: items (default: %(default)s)")

    train = _command(commands, "train", "train DSAN (and test the selected model)",
                     "Train DSAN. Options: defaults < --config file < command line; the run directory keeps "
                     "config.yaml, metrics.jsonl, train.log, best.pt, last.pt and test_metrics.json.")
    train.add_argument("--run", "--run-dir", dest="run", required=True, metavar="RUN",
                       help="run directory (required); under torchrun spell it --run-dir (torchrun reads --run as "
                            "its own --run-path)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in RUN after an interruption (default: start a new run)")
    train.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stdout (default: shown)")
    train.add_argument("--config", metavar="FILE",
                       help="YAML or JSON file of options, keys as the option names (default: none)")
    add_options(train)

    evaluate = _command(commands, "evaluate", "HR/MRR/NDCG@5/10/20 with full ranking; the last line is JSON")
    evaluate.add_argument("--run", metavar="RUN", help="run directory (required for --model dsan)")
    evaluate.add_argument("--model", choices=["dsan", "pop"], default="dsan",
                          help="pop: the most-popular baseline from the training clicks, needs --data "
                               "(default: %(default)s)")
    evaluate.add_argument("--data", metavar="DIR", help="data folder (default: the run's)")
    evaluate.add_argument("--split", choices=["test", "valid"], default="test",
                          help="the test set, or the run's validation split (default: %(default)s)")
    evaluate.add_argument("--checkpoint", choices=["best", "last"], default="best",
                          help="best: the selected epoch; last: the latest (default: %(default)s)")
    evaluate.add_argument("--attention", metavar="NAME", help="evaluate the same weights with another normaliser (default: the run's)")
    evaluate.add_argument("--valid-fraction", type=float, default=DEFAULTS.valid_fraction, metavar="X",
                          help="--model pop --split valid: the latest fraction of training sessions that validates "
                               "(default: %(default)s)")
    add_options(evaluate, ["eval_batch_size", "device", "protocol"], flags=EVALUATE_FLAGS)

    explain = _command(commands, "explain", "heat maps of one test session's attention (PNG)")
    explain.add_argument("--run", required=True, metavar="RUN", help="run directory (required)")
    explain.add_argument("--out", required=True, metavar="PNG", help="figure path (required)")
    explain.add_argument("--test-index", type=int, metavar="N",
                         help="sample of the prefix-expanded test set (default: the longest test prefix)")
    explain.add_argument("--data", metavar="DIR", help="data folder (default: the run's)")
    explain.add_argument("--attention", metavar="NAME", help="the learned side's normaliser (default: the run's)")
    explain.add_argument("--compare-with", metavar="NAME",
                         help="the other side's normaliser (default: softmax; entmax-reference beside a softmax run)")
    add_options(explain, ["protocol"])

    tune = _command(commands, "tune", "the technical appendix's grid search, selected on validation",
                    "Grid search over lr x dropout x wk (84 points), each selected on validation; the test set is "
                    "evaluated once, for the selected point. Rerunning continues; a run is reused only by a call "
                    "with the same settings.")
    tune.add_argument("--data", required=True, metavar="DIR", help="data folder (required)")
    tune.add_argument("--out", required=True, metavar="DIR", help="folder for runs/, results.csv, results.md (required)")
    tune.add_argument("--grid", choices=["appendix"], default="appendix",
                      help="the technical appendix's lr x dropout x wk grid (default: %(default)s)")
    from .tune import NOT_TUNE_OPTIONS, SUBSET_HELP

    tune.add_argument("--subset", metavar="SPEC", help=f"{SUBSET_HELP} (default: the whole grid)")
    tune.add_argument("--config", metavar="FILE", help="YAML or JSON file of the runs' other options (default: none)")
    tune.add_argument("--verbose", action="store_true", help="show each run's log lines (default: one line per run)")
    add_options(tune, exclude=NOT_TUNE_OPTIONS)

    from .demo import DEMO_EPOCHS

    demo = _command(commands, "demo", "synthetic data -> train -> evaluate -> heat map: a short run on the CPU")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs (default: %(default)s)")
    demo.add_argument("--attention", default=DEFAULTS.attention, metavar="NAME",
                      help="normaliser; it needs the built entmax_cuda kernels, entmax-reference does not (pure "
                           "PyTorch, slower) (default: %(default)s)")
    demo.add_argument("--sessions", type=int, default=SYNTHETIC_SESSIONS, help="synthetic sessions (default: %(default)s)")
    demo.add_argument("--items", type=int, default=SYNTHETIC_ITEMS, help="synthetic items (default: %(default)s)")
    return parser


def cmd_prepare(args) -> None:
    from .data import prepare

    stats = prepare(args.dataset, args.out, raw=args.raw, protocol=args.protocol, unsorted=args.unsorted,
                    seed=args.seed, synthetic_sessions=args.sessions, synthetic_items=args.items)
    print(f"wrote {args.out}: {stats['n_items']} items, train {stats['train']['sessions']} sessions / "
          f"{stats['train']['samples']} samples, test {stats['test']['sessions']} sessions / "
          f"{stats['test']['samples']} samples ({stats['protocol']} protocol)")


def cmd_train(args) -> None:
    from .train import prepare_run, train

    config = prepare_run(args.run, args.config, given_options(args), resume=args.resume)
    train(config, args.run, resume=args.resume, quiet=args.quiet)


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_popularity_on, evaluate_run, metrics_table

    config_module.check_value("eval_batch_size", args.eval_batch_size, label=EVALUATE_FLAGS["eval_batch_size"])
    config_module.check_value("valid_fraction", args.valid_fraction, config_module.COMMAND_LINE)
    batch_size = args.eval_batch_size or DEFAULTS.eval_batch_size
    if args.model == "pop":
        if not args.data:
            raise DsanError("--model pop needs --data DIR")
        metrics, notes = evaluate_popularity_on(args.data, args.split, args.valid_fraction, args.protocol, batch_size)
        title = f"most-popular baseline, {args.split}"
    else:
        if not args.run:
            raise DsanError("--run RUN is required (or --model pop --data DIR)")
        metrics, notes = evaluate_run(args.run, args.split, args.checkpoint, args.attention, args.data, args.protocol,
                                      batch_size, args.device or DEFAULTS.device)
        title = f"{args.run} ({args.checkpoint} checkpoint), {args.split}"
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(metrics_table(title, metrics))
    print(json.dumps(metrics))


def cmd_explain(args) -> None:
    from .explain import explain

    result = explain(args.run, args.out, args.test_index, args.data, args.attention, args.compare_with, args.protocol)
    print(json.dumps(result, indent=2))


def cmd_tune(args) -> None:
    from .tune import parse_subset, tune

    base = config_module.resolve(args.config, dict(given_options(args), data=args.data))
    grid = parse_subset(args.subset)
    tune(base, args.out, grid, quiet=not args.verbose)
    with open(f"{args.out}/results.md", encoding="utf-8") as f:
        print(f.read())


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, args.epochs, args.attention, args.sessions, args.items)


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "explain": cmd_explain,
            "tune": cmd_tune, "demo": cmd_demo}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .train import TrainingInterrupted
    except KeyboardInterrupt:
        print(f"dsan {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS

    try:
        COMMANDS[args.command](args)
    except DsanError as e:
        print(f"dsan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named cannot be read or created
        where = f"{e.filename}: " if e.filename else ""
        print(f"dsan {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"dsan {args.command}: {e}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except KeyboardInterrupt:
        print(f"dsan {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0
