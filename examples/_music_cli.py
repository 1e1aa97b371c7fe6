"""Command line of examples/mnist_music.py."""

from __future__ import annotations

import argparse
from pathlib import Path

# --quick shrinks the study to a CI-sized smoke test; explicit flags still win over these values.
QUICK = dict(seeds=[0, 1], pretrain_epochs=2, continue_epochs=1, epochs=2, task_samples=100,
             val_size=500, eval_size=1000, lambdas=[round(0.1 * i, 2) for i in range(11)],
             bootstrap=1000)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the empty ones (None, False) whose help text says what happens."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MUSIC reference study: sequential vs joint fine-tuning, task arithmetic,\n"
                    "TIES/DARE merging, task negation and transfer, over several seeds.\n"
                    "Writes results.json, report.md and PNG figures to --out.",
        epilog="examples:\n"
               "  python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k\n"
               "  python examples/mnist_music.py --dataset fashion-mnist\n"
               "  python examples/mnist_music.py --quick --data-dir ../shared/data/mnist-t10k\n"
               "  python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k "
               "--ft-optimizer sgd --ft-lr 1e-2\n"
               "  python examples/mnist_music.py --data-dir ../shared/data/mnist-t10k --sweep\n"
               "  python examples/mnist_music.py --render runs/mnist-t10k/results.json",
        formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist",
                   help="Which IDX data set to study; fashion-mnist uses class indices as 'digits'.")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="Folder with the IDX files (train-/t10k-images-idx3-ubyte, "
                        "train-/t10k-labels-idx1-ubyte, gzipped or not). With only the t10k files "
                        "the study splits the test set (test-split mode). Only read: without the "
                        "files the study stops at once (exit code 2). Default: ./data/<dataset> "
                        "(downloaded there by torchvision when its host answers), and "
                        "/usr/share/datasets/fashion-mnist for fashion-mnist.")
    d.add_argument("--no-download", action="store_true",
                   help="Never try torchvision's download when no IDX files are found.")
    d.add_argument("--no-verify", action="store_true",
                   help="Use files whose md5 does not match the known checksum (not recommended).")
    d.add_argument("--split-seed", type=int, default=0,
                   help="Seed of the data split (task sets, validation, evaluation); fixed across "
                        "--seeds (seeds vary only initialisation and shuffling) unless --vary-split.")
    d.add_argument("--vary-split", action="store_true",
                   help="Vary the data split with the seed: seed s uses split seed --split-seed + s, "
                        "so each seed has its own pretraining, task, validation and evaluation sets.")
    d.add_argument("--digits", type=int, nargs=3, default=[3, 4, 7], metavar="D",
                   help="The three task classes T1 T2 T3, in the sequential order.")
    d.add_argument("--task-samples", type=int, default=None,
                   help="Samples per task class set aside for fine-tuning "
                        "(default 1000; 300 in test-split mode).")
    d.add_argument("--val-size", type=int, default=None,
                   help="Validation samples (choose lambda, calibrate) taken from the pretraining "
                        "pool (default 5000; 1000 in test-split mode).")
    d.add_argument("--eval-size", type=int, default=3000,
                   help="Evaluation samples carved from the test split in test-split mode, "
                        "stratified to its class mix (the full test split evaluates otherwise).")
    t = p.add_argument_group("training")
    t.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="Seeds; each runs the whole protocol (model init and shuffles). Verdicts "
                        "need at least 5. Default: 0 1 2 3 4; with --sweep 0 … 9 (ten seeds, about "
                        "10 minutes in test-split mode on 2 CPU cores).")
    t.add_argument("--pretrain-epochs", type=int, default=5, help="Epochs of pretraining.")
    t.add_argument("--continue-epochs", type=int, default=2,
                   help="Extra pretraining epochs that make the 'continued' second pretrained model.")
    t.add_argument("--epochs", type=int, default=10, help="Fine-tuning epochs per task (and joint).")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="Optimizer of pretraining, and of fine-tuning unless --ft-optimizer is "
                        "given; a fresh one per run (sgd uses momentum 0.9).")
    t.add_argument("--pretrain-lr", type=float, default=1e-3, help="Pretraining learning rate.")
    t.add_argument("--ft-optimizer", choices=["adam", "sgd"], default=None,
                   help="Optimizer of the fine-tuning runs only (task, sequential, joint and the "
                        "transfer models' fine-tunes); pretraining keeps --optimizer. "
                        "Default: the same as --optimizer.")
    t.add_argument("--ft-lr", "--lr", dest="ft_lr", type=float, default=1e-3,
                   help="Learning rate of the fine-tuning runs only (--lr is the older name).")
    t.add_argument("--batch-size", type=int, default=64, help="Mini-batch size of every run.")
    t.add_argument("--replay-per-class", type=int, default=10,
                   help="Replay baseline: images per class, from the pretraining split, added to "
                        "each fine-tuning run's data for every class that run's data lacks.")
    t.add_argument("--sweep", action="store_true",
                   help="Run the protocol once per fine-tuning setting: SGD and Adam at lr 1e-2, "
                        "1e-3, 1e-4 and 1e-5 (pretraining unchanged, shared by the settings); "
                        "reports sequential − joint and every verdict per setting.")
    m = p.add_argument_group("task vectors")
    m.add_argument("--lambdas", type=float, nargs="+",
                   default=[round(0.05 * i, 2) for i in range(21)],
                   help="Scaling coefficients tried on the validation split.")
    m.add_argument("--ties-density", type=float, default=0.2,
                   help="TIES: fraction of each task vector's entries kept.")
    m.add_argument("--dare-drop", type=float, default=0.9,
                   help="DARE: fraction of each task vector's entries dropped.")
    m.add_argument("--ctv-density", type=float, default=0.2,
                   help="Consolidation: fraction of each task vector's entries kept, ranked by "
                        "integrated-gradient attribution.")
    m.add_argument("--ig-steps", type=int, default=16,
                   help="Consolidation: integration points of the integrated gradients; doubled "
                        "(up to --ig-max-steps) until the completeness gap is at most --ig-rtol.")
    m.add_argument("--ig-max-steps", type=int, default=128,
                   help="Consolidation: most integration points tried; the gap reached is reported.")
    m.add_argument("--ig-rtol", type=float, default=0.01,
                   help="Completeness tolerance |Σ IG − gain| / |gain| (the library's warning threshold).")
    m.add_argument("--forget", type=int, default=None,
                   help="Task class to forget by negation, one of --digits (default: the last).")
    m.add_argument("--control-threshold", type=float, default=0.95,
                   help="Keep validation accuracy on the other classes at least this fraction of "
                        "the pretrained model's: in negation (classes other than --forget) and in "
                        "the task-aware λ rule (classes other than --digits).")
    s = p.add_argument_group("statistics")
    s.add_argument("--bootstrap", type=int, default=10000, help="Bootstrap resamples for CIs.")
    s.add_argument("--equivalence-margin", type=float, default=0.02,
                   help="Margin of the verdicts (accuracy, as a fraction): transfer holds when "
                        "|θ_new+τ − θ_new fine-tuned| is within it; per task, gradual application "
                        "'degrades' when it drops below the fine-tuned model by more than it, and "
                        "the ctv 'performs well' when it does not.")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=None,
                   help="Run directory (default runs/<timestamp>).")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Where to train; auto picks cuda when available.")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1: this MLP gains nothing from more, and "
                        "one thread does not stall when other work shares the cores).")
    r.add_argument("--quick", action="store_true",
                   help="Smoke test (2 seeds, 2 epochs, 100 task samples, well under a minute): "
                        "checks that everything runs; it gives no verdicts.")
    r.add_argument("--render", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="Run nothing: write the tables of these runs' results.json into README.md "
                        "and docs/study.md (between their generated-block markers) and copy their "
                        "figures to docs/figures/study/<run folder name>-*.png.")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that flags given explicitly override the quick preset
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = list(range(10 if args.sweep else 5))
    if args.forget is None:
        args.forget = args.digits[-1]
    if args.ft_optimizer is None:
        args.ft_optimizer = args.optimizer
    if len(set(args.digits)) != 3 or not all(0 <= c <= 9 for c in args.digits):
        parser.error("--digits needs three distinct classes in 0..9")
    if args.forget not in args.digits:
        parser.error("--forget must be one of --digits (its task vector is what gets negated)")
    return args
