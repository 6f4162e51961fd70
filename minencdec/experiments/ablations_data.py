"""The data of `minencdec reproduce` (ablations.py): the plays split whole, the drug reviews,
and passages of the validation plays for the which-play task.

    ablation_data(texts, reviews, seed)   -> Data (every split, fixed before the run)
    play_passages(texts)                  -> (train, validation, test) passages labelled by play
"""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import next_lines


@dataclass
class Data:
    """Plays split whole (datasets.next_lines decides which play goes where), the review
    splits and the passage splits. `texts[split]`: the plays' texts; train holds every play
    in no held-out split. The two classification tasks are CLASSIFY's."""

    plays: dict
    texts: dict
    next_lines: tuple                  # (train, validation, test) {"input", "target", "play"}
    reviews: tuple                     # (train, validation, test) {"text", "label"}
    passages: tuple                    # (train, validation, test) {"text", "label": which play}


# The classification tasks: drug-review sentiment, and which play a passage is from. The toys
# never see modern English before fine-tuning, and at this scale their review classifiers
# stay at the majority class; the play task reads the language they were pretrained on.
CLASSIFY = {"reviews": "drug-review sentiment", "plays": "which play a passage is from"}


def ablation_data(texts, reviews, seed=0) -> Data:
    lines = next_lines(texts, seed=seed)
    held = [sorted({e["play"] for e in split}) for split in lines[1:]]
    plays = {"train": [i for i in range(len(texts)) if i not in held[0] + held[1]],
             "validation": held[0], "test": held[1]}
    return Data(plays, {k: [texts[i] for i in v] for k, v in plays.items()}, lines, reviews,
                play_passages([texts[i] for i in plays["validation"]]))


def play_passages(texts, lines=4, parts=(0.7, 0.1)) -> tuple:
    """(train, validation, test) {"text", "label"}: passages of `lines` speech lines (as
    datasets.next_lines keeps them) labelled with their play's index in `texts`. Each play is
    cut in order: its first 70% of passages train, the next 10% validate, the last 20% test,
    so a test passage comes from other scenes than the ones the classifier was trained on.
    The plays are the validation plays: no arm and no pretraining ever read them."""
    splits = ([], [], [])
    for label, text in enumerate(texts):
        speech = [ln.strip() for ln in text.splitlines()]
        speech = [ln for ln in speech if ln and not (ln.startswith("[") or ln.isupper())]
        passages = ["\n".join(speech[i:i + lines]) for i in range(0, len(speech) - lines + 1, lines)]
        a, b = int(parts[0] * len(passages)), int((parts[0] + parts[1]) * len(passages))
        for split, chunk in zip(splits, (passages[:a], passages[a:b], passages[b:])):
            split.extend({"text": t, "label": label} for t in chunk)
    return splits
