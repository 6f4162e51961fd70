"""`minencdec reproduce`: the paper's ablations on tiny from-scratch models (experiments/ablations.py).

    minencdec reproduce [--out runs/reproduce] [--quick] [--seeds 0 1]

Pretrains a small and a large Gemma 2 toy on Shakespeare, adapts six encoder-decoders from
them (balanced and unbalanced pairs, cross-attention warmup none / short / long, PrefixLM+KD
against UL2, a causal encoder), trains each for the same budget, scores them on held-out
plays, drug-review sentiment and which play a passage is from, and writes report.md: each
claim of the paper with what this run measured and whether it agrees. An interrupted run
continues where it stopped (run the same command again); the default plan is sized for about
35 minutes on 2 cores (the budget: an hour), --quick for about a minute.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path

from minencdec.experiments import ablations
from minencdec.experiments.ablations_report import write_report
from minencdec.experiments.datasets import drug_reviews
from minencdec.model.backend import prepare
from minencdec.training.data import shakespeare_texts
from minencdec.training.rundir import locked

from .options import add_backend_argument, non_negative_int


def cmd_reproduce(args):
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be different seeds, got {' '.join(map(str, args.seeds))}")
    plan = ablations.QUICK if args.quick else ablations.Plan()
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
    prepare(args.backend)
    run = Path(args.out)
    t0 = time.monotonic()
    with locked(run):
        data = ablations.ablation_data(shakespeare_texts(), drug_reviews(seed=0), seed=0)
        results = ablations.run(run, data, plan, args.backend, command=_command(args))
        report = write_report(run)
    print(f"\nwrote {report} ({(time.monotonic() - t0) / 60:.1f} min this session, "
          f"{results['time']['minutes']:.1f} min in all)")
    for claim in results["claims"]:
        verdicts = ", ".join(f"{r['metric']} {r['verdict']}" for r in claim["results"])
        print(f"  {claim['title']}: {verdicts}")
    return 0


def _command(args) -> str:
    """The command line that makes this run (results.json and report.md name it)."""
    words = ["minencdec", "reproduce", "--out", shlex.quote(str(args.out))] + (["--quick"] if args.quick else [])
    words += ["--seeds", *map(str, args.seeds)] if args.seeds else []
    return " ".join(words + (["--backend", args.backend] if args.backend != "numba" else []))


def add_commands(sub):
    p = sub.add_parser("reproduce", help="the paper's ablations on tiny from-scratch models (balanced vs "
                                         "unbalanced, cross-attention warmup, PrefixLM+KD vs UL2, causal encoder)")
    p.add_argument("--out", default="runs/reproduce", help="run directory (default runs/reproduce)")
    p.add_argument("--quick", action="store_true", help="a smoke run of about a minute on smaller toys")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=None,
                   help="seeds of the arms and classifiers (default: 0 1; --quick: 0)")
    add_backend_argument(p)
    p.set_defaults(func=cmd_reproduce)
