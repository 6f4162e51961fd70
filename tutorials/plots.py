"""What the tutorials share for drawing: where figures go, boxes and arrows, two layouts.

    import plots                          # beside the tutorials; sets matplotlib up first
    plots.save(fig, "01_rope.png")        # into plots.FIG

Figures go to `$MINENCDEC_FIGURES` when it is set, else to `tutorials/_output/`, which git
ignores: running a tutorial (as a script or a notebook) never rewrites the committed
pictures in `tutorials/figures/`. To redraw those, ask for them:
`MINENCDEC_FIGURES=tutorials/figures python tutorials/NN_name.py`.

Nothing here computes a number a tutorial claims. The tutorials compute every number with
the library and assert it; this module only turns them into pixels: box-and-arrow diagrams
(tutorials 0, 4 and 10) and the per-row agreement plot of the verification tutorials.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")                # a script: write files, open no window
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_FIGURES = HERE / "_output"      # git-ignored (see .gitignore)
FIG = Path(os.environ.get("MINENCDEC_FIGURES") or DEFAULT_FIGURES)
FIG.mkdir(parents=True, exist_ok=True)


def save(fig, name, dpi=110):
    """Write `fig` as FIG / name (a PNG named NN_what.png, NN the tutorial's number)."""
    fig.savefig(FIG / name, dpi=dpi)
    return FIG / name


# ----------------------------------------------------------------------------- boxes and arrows

def box(ax, x, y, text, fc="white", ec="0.45", size=8.5, **kw):
    """A rounded box with `text` centred at (x, y) in data coordinates; returns the Text."""
    return ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=3,
                   bbox=dict(boxstyle="round,pad=0.35", fc=fc, ec=ec), **kw)


def arrow(ax, src, dst, colour="0.3", rad=0.0, src_at=(0.5, 0.0), dst_at=(0.5, 1.0), style="->", lw=1.2, ls="-"):
    """An arrow from box `src` to box `dst` (Text artists from `box`). src_at / dst_at are
    points on each box as fractions of its extent: (0.5, 0) is the middle of the bottom edge."""
    ax.annotate("", xy=dst_at, xycoords=dst, xytext=src_at, textcoords=src, zorder=2,
                arrowprops=dict(arrowstyle=style, color=colour, lw=lw, ls=ls, shrinkA=4, shrinkB=4,
                                connectionstyle=f"arc3,rad={rad}"))


def blank(ax, xlim, ylim, title=None):
    """An axis for a diagram: fixed limits, no frame, an optional title."""
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=11)


# ----------------------------------------------------------------------------- tutorial 4's map

def adaptation_map(ax, title, edges, order, colours, layout_rect=(0, 0.03, 1, 1)):
    """Draw which source tensor each adapted tensor is (tutorial 4).

    edges: {(target side, part): (source label, source part) or "random"}; `order` sorts
    the parts top to bottom; colours: {target side: colour}. Target sides are drawn in the
    order of `colours`, each source block beside the side it feeds (one source: centred).
    The figure is laid out here (tight_layout in `layout_rect`): the arrows are placed from
    the boxes' measured sizes, so call no layout after it."""
    ys, y = {}, 0.0                                      # ("t" or "s", block, part) -> height
    for side in colours:                                 # target blocks: encoder on top, decoder below
        ax.text(1.0, y + 0.9, f"T5Gemma {side}: model.{side}.*", fontsize=10, weight="bold")
        ys[("top", side)] = y
        for part in sorted({p for sd, p in edges if sd == side}, key=order.index):
            ys[("t", side, part)], y = y, y - 1
        y -= 1.6
    labels = sorted({e[0] for e in edges.values() if e != "random"})
    sides = list(colours)
    for k, label in enumerate(labels):                   # source blocks: centred, or one per target
        parts = sorted({e[1] for e in edges.values() if e != "random" and e[0] == label}, key=order.index)
        top = ys[("top", sides[min(k, len(sides) - 1)])] if len(labels) > 1 else (y + len(parts)) / 2
        ax.text(0.0, top + 0.9, f"{label}: model.*", fontsize=10, weight="bold")
        for j, part in enumerate(parts):
            ys[("s", label, part)] = top - j
    boxes = {}
    for key, yy in ys.items():
        if key[0] == "top":
            continue
        kind, block, part = key
        random_init = kind == "t" and edges[(block, part)] == "random"
        boxes[key] = ax.text(1.0 if kind == "t" else 0.0, yy, part, va="center", fontsize=9,
                             family="monospace", bbox=dict(boxstyle="round,pad=0.25",
                             fc="mistyrose" if random_init else "white", ec="tab:red" if random_init else "0.5"))
    ax.set_xlim(-0.05, 1.95)
    ax.set_ylim(y + 1, 2)
    ax.axis("off")
    ax.set_title(title, fontsize=12)
    ax.figure.tight_layout(rect=layout_rect)             # the final layout first, then measure
    ax.figure.canvas.draw()                              # now the boxes have sizes: arrows edge to edge
    to_data = ax.transData.inverted()
    edge = {k: to_data.transform(t.get_window_extent().get_points())[:, 0] for k, t in boxes.items()}
    tail = max(e[1] for k, e in edge.items() if k[0] == "s") + 0.02   # arrows leave from one column
    for k in (k for k in boxes if k[0] == "s"):
        ax.plot([edge[k][1] + 0.005, tail], [ys[k], ys[k]], ":", color="0.6", lw=1)
    for (kind, block, part) in (k for k in boxes if k[0] == "t"):
        yy = ys[(kind, block, part)]
        if edges[(block, part)] == "random":
            ax.text(edge[(kind, block, part)][1] + 0.03, yy, "random N(0, 0.02),\nnorm offsets 0",
                    va="center", fontsize=7.5, color="tab:red")
            continue
        src = ("s", *edges[(block, part)])
        colour = "tab:orange" if "cross" in part else colours[block]
        ax.annotate("", xy=(edge[(kind, block, part)][0] - 0.01, yy), xytext=(tail, ys[src]),
                    arrowprops=dict(arrowstyle="->", color=colour, lw=1.2, alpha=0.8))


# ----------------------------------------------------------------------------- tutorials 11 and 12

FLOOR = 1e-18           # where an exact 0 is drawn on the log axis of `agreement`


def agreement(ax, names, series, levels, title, ylabel):
    """One line per comparison: the max relative difference of every row (a list of
    `verify.compare_dumps` rows per label), exact zeros drawn at FLOOR; `levels` are
    (value, text, colour) reference lines."""
    x = list(range(len(names)))
    for label, (rows, style) in series.items():
        ax.semilogy(x, [max(r.max_rel, FLOOR) for r in rows], style, ms=4, label=label)
    for level, text, colour in levels:
        ax.axhline(level, color=colour, ls="--", lw=1)
        ax.text(len(x) - 0.3, level, text, va="center", fontsize=8, color=colour, backgroundcolor="white")
    ax.axhspan(FLOOR / 3, 1e-17, color="0.93")          # below: the exact zeros, not a scale
    short = [n.replace("coder.layers.", "c.L").replace("coder.", "c.").replace("self_attn", "sa")
             .replace("cross_attn", "xa") for n in names]
    ax.set_xticks(x, short, rotation=65, ha="right", fontsize=7)
    ax.set_ylim(FLOOR / 3, 30)
    ax.set_xlim(-0.6, len(x) + 3.5)                      # room for the labels on the right
    ax.set_yticks([FLOOR, 1e-15, 1e-12, 1e-9, 1e-6, 1e-3], ["0 (bit-equal)", "1e-15", "1e-12", "1e-9", "1e-6", "1e-3"])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
