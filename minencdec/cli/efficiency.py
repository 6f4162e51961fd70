"""`minencdec efficiency`: FLOPs per example of decoder-only and encoder-decoder models at the
paper's scale, measured latency of tiny ones, and the plot of both (the accounting itself is
minencdec.model.efficiency)."""

from __future__ import annotations

import os

from minencdec.model.backend import prepare
from minencdec.model.efficiency import flops, measure, paper_models, random_model, tiny_models

from .options import add_backend_argument, positive_int


def run(out_dir, quick=False, repeats=3, backend="numpy"):
    """Print the FLOPs table and the measured latencies, draw `efficiency.png` in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paper, tiny = paper_models(), tiny_models()
    ins = [128, 512, 2048, 8192]
    outs = [32, 128, 512, 2048]
    print("FLOPs per example (GFLOP), useful attention pairs only; models at paper scale (vocab 256000)")
    print(f"{'model':<16} {'in':>5} {'out':>5} {'input part':>11} {'per in tok':>10} {'output part':>11} "
          f"{'per out tok':>11} {'total':>9}")
    for name, cfg in paper.items():
        for n_in, n_out in [(512, 128), (2048, 128), (512, 512), (8192, 32)]:
            f = flops(cfg, n_in, n_out)
            print(f"{name:<16} {n_in:>5} {n_out:>5} {f.input / 1e9:>11.0f} {f.input / n_in / 1e9:>10.2f} "
                  f"{f.output / 1e9:>11.0f} {f.output / n_out / 1e9:>11.2f} {f.total / 1e9:>9.0f}")

    m_ins, m_outs = ([8, 32], [4, 16]) if quick else ([16, 64, 256], [8, 32, 128])
    fixed_out, fixed_in = m_outs[1], m_ins[1]
    timed = {name: {} for name in tiny}
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS")
    print(f"\nmeasured wall time of minencdec generation (float32, batch 1, best of {repeats}, backend {backend}), "
          f"tiny models, BLAS threads: {threads or 'default'}")
    if not threads:
        print("(for steady timings on a shared machine run with OMP_NUM_THREADS=1: BLAS threads "
              "fighting over busy cores can stall each small matmul for a whole scheduler tick)")
    print(f"{'model':<20} {'in':>4} {'out':>4} {'input ms':>9} {'ms/step':>8} {'tok/s':>7} {'total ms':>9}")
    for name, cfg in tiny.items():
        model = random_model(cfg, backend=backend)
        measure(model, m_ins[0], 2, repeats=1)             # warm-up: first calls allocate and page in
        grid = [(n, fixed_out) for n in m_ins] + [(fixed_in, n) for n in m_outs if n != fixed_out]
        for n_in, n_out in grid:
            inp, per_step = measure(model, n_in, n_out, repeats)
            total = inp + (n_out - 1) * per_step
            timed[name][n_in, n_out] = total
            print(f"{name:<20} {n_in:>4} {n_out:>4} {inp * 1e3:>9.1f} {per_step * 1e3:>8.2f} "
                  f"{1 / per_step:>7.0f} {total * 1e3:>9.1f}")

    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    styles = {"Gemma 2 2B": "C0-o", "Gemma 2 9B": "C3-o", "T5Gemma 2B-2B": "C0--s",
              "T5Gemma 9B-2B": "C2--s", "T5Gemma 9B-9B": "C3--s"}
    for name, cfg in paper.items():
        ax[0, 0].plot(ins, [flops(cfg, n, 128).total / 1e12 for n in ins], styles[name], label=name)
        ax[0, 1].plot(outs, [flops(cfg, 512, n).total / 1e12 for n in outs], styles[name], label=name)
    ax[0, 0].set(title="(a) FLOPs per example vs input length (128 generated)", xlabel="input tokens")
    ax[0, 1].set(title="(b) FLOPs per example vs output length (input 512)", xlabel="generated tokens")
    tstyles = dict(zip(tiny, ["C0-o", "C3-o", "C0--s", "C2--s"]))
    for name in tiny:
        ax[1, 0].plot(m_ins, [timed[name][n, fixed_out] * 1e3 for n in m_ins], tstyles[name], label=name)
        ax[1, 1].plot(m_outs, [timed[name][fixed_in, n] * 1e3 for n in m_outs], tstyles[name], label=name)
    ax[1, 0].set(title=f"(c) measured latency vs input length ({fixed_out} generated)", xlabel="input tokens")
    ax[1, 1].set(title=f"(d) measured latency vs output length (input {fixed_in})", xlabel="generated tokens")
    for a in ax[0]:
        a.set(xscale="log", yscale="log", ylabel="TFLOPs per example")
    for a in ax[1]:
        a.set(xscale="log", yscale="log", ylabel="ms per example (NumPy, float32, 1 example)")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    for a, xs in zip(ax.flat, (ins, outs, m_ins, m_outs)):
        a.set_xticks(xs, [str(x) for x in xs])
        a.xaxis.set_minor_formatter(NullFormatter())
        a.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        a.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.1e}"[0] in "25" else ""))
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("Decoder-only vs encoder-decoder Gemma: inference cost (top: paper-scale FLOPs from the "
                 "config; bottom: tiny random models, wall time)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "efficiency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nwrote {path}")
    return path


def cmd_efficiency(args):
    prepare(args.backend)
    run(args.out, args.quick, args.repeats, args.backend)
    return 0


def add_command(sub):
    s = sub.add_parser("efficiency", help="FLOPs and measured latency: decoder-only vs encoder-decoder, plotted")
    s.add_argument("--out", default="efficiency_out", help="directory for efficiency.png")
    s.add_argument("--quick", action="store_true", help="fewer, shorter timings (seconds instead of a minute)")
    s.add_argument("--repeats", type=positive_int, default=3, help="timing repeats; the best is kept")
    add_backend_argument(s)
    s.set_defaults(func=cmd_efficiency)
