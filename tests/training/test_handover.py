"""Handing a run over to PyTorch and back: export-torch, examples/continue_in_pytorch.py, import-torch.

The oracle is minencdec's own uninterrupted run. N steps here, `export-torch`, N more in the
example script (transformers' model, torch's AdamW and LambdaLR, accelerate) must give the
losses and the weights of 2N steps here. transformers' T5Gemma is held to minencdec by the
oracle tests and torch's AdamW by test_optim.py; what this checks is the handover itself: the
moments under torch's parameter ids, the step counts, the schedule's position, the batches, the
objective. The way back (import-torch, then `train --resume`) is held to 3N steps here.

Tolerance: both sides compute in float32, in other summation orders. Measured on these runs,
weights agree within 3e-7 of each tensor's largest entry and losses within 1.1e-6 (a few float32
ulps of ~6). They are held to RTOL_F32 = 1e-4, the suite's float32 tolerance: a handover that is
one schedule step off, resets the bias correction or loses the moments moves the weights by 1e-3
or more (the negative control, the moments dropped, measures 0.25).
"""

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import RTOL_F32, assert_close

from minencdec.cli import handover as handover_cli
from minencdec.cli import train as train_cli
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.model.config import T5GemmaConfig, gemma3_config
from minencdec.model.t5gemma import T5GemmaModel
from minencdec.training.optim import warmup_cosine

cli_main = importlib.import_module("minencdec.cli.main")       # the module (minencdec.cli.main is the function)
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "continue_in_pytorch.py"
N = 3
RUN = ["--batch-size", "4", "--seq-len", "16", "--warmup", "1", "--lr", "1e-3", "--eval-every", "100",
       "--save-every", "100", "--backend", "numpy"]
_BUILD_PARSER, _TRAIN_CONFIG, _TRAIN = cli_main.build_parser, train_cli.train_config, train_cli.train


def needs_torch():
    for name in ("torch", "transformers", "accelerate"):
        pytest.importorskip(name)


def _parser():
    """The command line with export-torch and import-torch (until cli/main.py registers them)."""
    parser = _BUILD_PARSER()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "export-torch" not in sub.choices:
        handover_cli.add_commands(sub)
    return parser


def minencdec(*argv, stop_after=None):
    """Exit code of `minencdec argv`, every step logged; `stop_after`: save and stop at that step,
    as Ctrl-C would (the schedule still runs over --steps)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_main, "build_parser", _parser)
        mp.setattr(train_cli, "train_config",
                   lambda args, **kw: dataclasses.replace(_TRAIN_CONFIG(args, **kw), log_every=1))
        if stop_after is not None:
            mp.setattr(train_cli, "train", functools.partial(_TRAIN, stop_after=stop_after))
        try:
            return cli_main.main([str(a) for a in argv])
        except SystemExit as e:
            return e.code


def corpus(path, lines=300):
    rng = np.random.default_rng(0)
    who, verbs, what = ["the king", "a fool", "my lord", "the queen"], ["doth love", "shall see"], ["the crown.", "his friend."]
    path.write_text("\n".join(f"{who[rng.integers(4)]} {verbs[rng.integers(2)]} {what[rng.integers(2)]}"
                              for _ in range(lines)))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A nano Gemma 2 pretrained for 4 steps, its T5Gemma adaptation, a random T5Gemma 2 with
    the same tokenizer, and the text."""
    tmp = tmp_path_factory.mktemp("handover")
    text = corpus(tmp / "corpus.txt")
    assert minencdec("pretrain", "--out", tmp / "pre", "--data", text, "--preset", "nano", "--vocab-size", 400,
                     "--steps", 4, *RUN) == 0
    adapt_checkpoints(tmp / "pre" / "checkpoint", tmp / "pre" / "checkpoint", tmp / "t5")
    g3 = gemma3_config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                       layer_types=("sliding_attention", "full_attention"))
    T5GemmaModel.random(T5GemmaConfig(g3, g3), seed=1).save_pretrained(tmp / "t5g2")
    shutil.copy(tmp / "pre" / "checkpoint" / "tokenizer.model", tmp / "t5g2")
    return tmp


def train_args(made, model, objective, steps, extra=()):
    teacher = ["--teacher", made / "pre" / "checkpoint"] if objective == "prefixlm-kd" else []
    return ["train", "--model", made / model, "--objective", objective, "--data", made / "corpus.txt",
            "--steps", steps, *RUN, *teacher, *extra]


def runs(made, tmp, objective, model="t5", total=2 * N, stops=(N, None), extra=()):
    """The run stopped at each of `stops` (None: straight to `total`), each in its own directory."""
    out = {}
    for stop in stops:
        out[stop] = tmp / f"{objective}-{model}-{stop or 'all'}"
        assert minencdec(*train_args(made, model, objective, total, extra), "--out", out[stop], stop_after=stop) == 0
    return out


def export(made, run, out, objective):
    extra = ["--teacher", made / "pre" / "checkpoint"] if objective == "prefixlm-kd" else []
    assert minencdec("export-torch", run, "--out", out, "--data", made / "corpus.txt", *extra) == 0
    return out


def continue_in_torch(handover, out, steps, launch=False):
    """N more steps in examples/continue_in_pytorch.py: under `accelerate launch` (one CPU process)
    or, to keep the suite fast, its train() called in this process."""
    if launch:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--num_cpu_threads_per_process", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(EXAMPLE),
               str(handover), "--out", str(out), "--steps", str(steps)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return out
    import torch
    spec = importlib.util.spec_from_file_location("continue_in_pytorch", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # tiny matrices: a second thread only waits (as in the launch)
    try:
        example.train(argparse.Namespace(handover=str(handover), out=str(out), steps=steps))
    finally:
        torch.set_num_threads(threads)
    return out


def losses(history_file):
    state = json.loads(Path(history_file).read_text())
    return {step: loss for step, loss, *_ in state["history"]["train"]}


def assert_same_run(got_dir, got_history, want_run, steps):
    """The losses of `steps` and the final weights of `got_dir` equal those of the minencdec run."""
    want = losses(want_run / "checkpoint" / "trainer_state.json")
    got = losses(got_history)
    for step in steps:
        assert_close(f"loss at step {step}", got[step], want[step], RTOL_F32)
    ours = load_pretrained(want_run / "checkpoint").params
    theirs = load_pretrained(got_dir).params
    for name in ours:
        assert_close(name, theirs[name], ours[name], RTOL_F32)


# ---------------------------------------------------------------------------- the hand-over

@pytest.fixture(scope="module")
def prefixlm(made, tmp_path_factory):
    """A PrefixLM run of 3N steps: stopped at N, exported, N steps in PyTorch under
    `accelerate launch`; and, as oracles, the run stopped at 2N and straight to 3N."""
    needs_torch()
    tmp = tmp_path_factory.mktemp("prefixlm")
    r = runs(made, tmp, "prefixlm", total=3 * N, stops=(N, 2 * N, None))
    handover = export(made, r[N], tmp / "handover", "prefixlm")
    torch_dir = continue_in_torch(handover, tmp / "torch", N, launch=True)
    return {"runs": r, "handover": handover, "torch": torch_dir, "tmp": tmp}


def test_accelerate_launch_continues_the_run_where_it_stopped(prefixlm):
    h = json.loads((prefixlm["torch"] / "handover.json").read_text())
    assert h["step"] == 2 * N and h["written_by"] == "examples/continue_in_pytorch.py"
    assert_same_run(prefixlm["torch"], prefixlm["torch"] / "handover.json", prefixlm["runs"][2 * N],
                    range(1, 2 * N + 1))


# transformers writes T5Gemma 2's vision tower; minencdec reads past it and says so, as documented
@pytest.mark.filterwarnings("ignore:.*minencdec is text-only:UserWarning")
@pytest.mark.parametrize("objective, model, extra", [
    ("prefixlm-kd", "t5", ()), ("ul2", "t5", ()), ("prefixlm", "t5g2", ()),
    ("prefixlm", "t5", ("--cross-attn-warmup", N + 1)),          # handed over while only cross-attention trains
])
def test_every_objective_t5gemma2_and_a_warmup_continue_in_torch(made, tmp_path, capsys, objective, model, extra):
    needs_torch()
    r = runs(made, tmp_path, objective, model, extra=extra)
    handover = export(made, r[N], tmp_path / "handover", objective)
    h = json.loads((handover / "handover.json").read_text())
    if objective == "prefixlm-kd":
        assert (handover / "teacher" / "model.safetensors").is_file()
    if extra:                                    # the frozen parameters have no AdamW state yet, as in torch
        assert h["freeze"]["steps"] == N + 1 and set(h["optimizer"]["param_steps"]) == set(h["freeze"]["names"])
    torch_dir = continue_in_torch(handover, tmp_path / "torch", N)
    assert_same_run(torch_dir, torch_dir / "handover.json", r[None], range(N + 1, 2 * N + 1))
    capsys.readouterr()                          # and back: the printed command resumes it (nothing left to do)
    assert minencdec("import-torch", torch_dir, "--out", tmp_path / "back") == 0
    _resume(capsys.readouterr().out)
    assert json.loads((tmp_path / "back" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2 * N


def test_negative_control_without_the_moments_the_run_differs(prefixlm, tmp_path):
    """The same hand-over with AdamW's state dropped (fresh moments and step counts in torch)
    must fail the comparison: the check sees what the moments carry."""
    import torch
    dropped = tmp_path / "dropped"
    shutil.copytree(prefixlm["handover"], dropped)
    state = torch.load(dropped / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(json.loads((dropped / "handover.json").read_text())["optimizer"]["param_steps"])
    state["state"] = {}
    torch.save(state, dropped / "optimizer.pt")
    torch_dir = continue_in_torch(dropped, tmp_path / "torch", N)
    with pytest.raises(AssertionError, match="DIFF|rtol"):
        assert_same_run(torch_dir, torch_dir / "handover.json", prefixlm["runs"][2 * N], range(N + 1, 2 * N + 1))


def test_the_torch_state_dict_is_keyed_as_torch_keys_it(prefixlm):
    """Ids are positions in the param groups, each group in named_parameters() order; the moments
    under each id are the run's own, and torch loads the dict into an AdamW over the model."""
    import torch
    from transformers import AutoModelForSeq2SeqLM
    handover = prefixlm["handover"]
    h = json.loads((handover / "handover.json").read_text())
    model = AutoModelForSeq2SeqLM.from_pretrained(handover)
    order = [n for n, _ in model.named_parameters()]
    decayed, kept = (g["params"] for g in h["optimizer"]["groups"])
    assert sorted(decayed + kept) == sorted(order)                                  # every parameter once
    for group in (decayed, kept):
        assert group == [n for n in order if n in set(group)]                       # in named_parameters() order
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed) and all(model.get_parameter(n).ndim == 1 for n in kept)
    state = torch.load(handover / "optimizer.pt", weights_only=True)
    assert [g["params"] for g in state["param_groups"]] == [list(range(len(decayed))),
                                                           list(range(len(decayed), len(order)))]
    run_moments = _safetensors(prefixlm["runs"][N] / "checkpoint" / "optimizer.safetensors")
    for i, name in enumerate(decayed + kept):                                      # id i: position in the groups
        assert int(state["state"][i]["step"]) == N
        for moment in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(state["state"][i][moment].numpy(), run_moments[f"{moment}/{name}"])
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [named[n] for n in g["params"]]} for g in h["optimizer"]["groups"]])
    opt.load_state_dict(state)
    # the next update's rate: --lr 1e-3 warmed up over 1 step, cosine to 1e-4 over 3N (the RUN options)
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_cosine(1e-3, 1, 3 * N, 1e-4)(N), rel=1e-14)
    assert h["scheduler_state_dict"]["last_epoch"] == N


def _safetensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


# ---------------------------------------------------------------------------- and back

def _resume(printed):
    """Run the `train --resume` command import-torch printed (on the reference backend)."""
    command = next(line for line in printed.splitlines() if "--resume" in line)
    argv = shlex.split(command)[1:]
    assert argv[:2] == ["train", "--resume"]
    assert minencdec(*argv, "--backend", "numpy") == 0


def test_import_torch_then_resume_finishes_the_run(made, prefixlm, tmp_path, capsys):
    back = tmp_path / "back"
    capsys.readouterr()
    assert minencdec("import-torch", prefixlm["torch"], "--out", back) == 0
    _resume(capsys.readouterr().out)
    straight = prefixlm["runs"][None]
    assert_same_run(back / "checkpoint", back / "checkpoint" / "trainer_state.json", straight, range(1, 3 * N + 1))


def test_export_then_import_loses_nothing(made, prefixlm, tmp_path, capsys):
    """Without torch in between, export + import + resume is the uninterrupted run bit for bit."""
    back = tmp_path / "back"
    capsys.readouterr()
    assert minencdec("import-torch", prefixlm["handover"], "--out", back) == 0
    _resume(capsys.readouterr().out)
    straight = prefixlm["runs"][None]
    assert losses(back / "checkpoint" / "trainer_state.json") == losses(straight / "checkpoint" / "trainer_state.json")
    ours, theirs = load_pretrained(straight / "checkpoint").params, load_pretrained(back / "checkpoint").params
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours)
