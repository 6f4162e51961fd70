"""Handing a training run over to PyTorch and back: the handover directory.

    export_run("runs/t5", "handover", train_rows, val_rows, data_sha256=...)   # minencdec -> torch
    accelerate launch examples/continue_in_pytorch.py handover --out handover-2
    import_run("handover-2", "runs/t5-back")           # torch -> minencdec; `train --resume` continues

A run is more than its weights: AdamW's moments and step counts, the schedule's position, the
data position and the objective. Our AdamW is torch.optim.AdamW (optim.py), batches are a pure
function of (rows, batch size, seed, step) (data.py), so a run continues exactly in torch when
the directory below holds all of them:

    config.json, model.safetensors  the model: a Hugging Face directory transformers loads
    tokenizer.model                 the run's tokenizer (UL2's sentinel and mode ids)
    optimizer.pt                    torch.optim.AdamW's state_dict(), written by torch.save: the one
                                    pickle here. Parameter ids are torch's: positions in the
                                    param groups, each group in model.named_parameters() order
    optimizer.safetensors           the same moments by parameter name, "exp_avg/NAME",
                                    "exp_avg_sq/NAME": what import_run reads (it never unpickles)
    data.safetensors                "train_rows", "val_rows": the packed token rows (int32)
    teacher/                        prefixlm-kd only: the decoder-only teacher, a Hugging Face directory
    handover.json                   everything else, plain JSON (HANDOVER_FORMAT):
      step                  optimizer steps done; the next batch is the batch of this step
      optimizer             betas, eps, weight_decay, clip, groups (torch names per group, in
                            id order), param_steps (torch name -> AdamW's own step count),
                            checkpoint_names (torch name -> the checkpoint's tensor name)
      schedule              kind, lr, min_lr, warmup_steps, total_steps: lr of update s is
                            optim.warmup_cosine(...)(s); scheduler_state_dict is torch's LambdaLR
                            state at this step (lr_lambda(e) = lr_at(e) / lr)
      freeze                names trained alone for the first `steps` steps (cross-attention warmup)
      data                  file, batch_size, seed, seq_len, data_sha256, source and field (the
                            text's path and JSON field); the batch of step s is
                            Seq2SeqTask(objective, rows, ...).batch(s): batches() below
      objective             name, temperature, alpha, teacher (a directory name or null)
      history               {"train": [[step, loss, lr, tokens/s]], "val": [[step, loss]]}
      minencdec             train_config and settings of trainer_state.json, written back by import_run

Names: T5Gemma's torch parameter names are its checkpoint names; T5Gemma 2 holds its text
encoder under model.encoder.text_model.* (beside a vision tower minencdec does not train, which
is in no param group). Weight decay groups follow optim.matrices_only: 1-D tensors do not decay.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from minencdec.files.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, CheckpointError, check_destination,
                                       recover_checkpoint, save_tensors)
from minencdec.files.replace import write_directory
from minencdec.files.safetensors_file import SAVE_TAGS, write_file, write_safetensors
from minencdec.io import tokenizer as tk
from minencdec.io.pretrained import VISION, load_pretrained

from .rundir import CHECKPOINT_DIR, STATE_FILE, check_start, digest_bytes, digest_params, locked, read_state
from .tasks import OBJECTIVES, Seq2SeqTask
from .train import OPTIMIZER_FILE, TrainConfig, load_checkpoint, make_optimizer, model_settings, save_checkpoint

HANDOVER_FORMAT = "minencdec.handover/1"
HANDOVER_FILE, TORCH_OPTIMIZER_FILE, DATA_FILE, TEACHER_DIR = "handover.json", "optimizer.pt", "data.safetensors", "teacher"
MOMENTS = ("exp_avg", "exp_avg_sq")
TEXT_ENCODER = ("model.encoder.", "model.encoder.text_model.")      # T5Gemma 2: checkpoint, torch


class HandoverError(CheckpointError):
    """A run that cannot be handed over, or a handover directory that cannot be read back."""


def torch_name(name: str, family: str) -> str:
    """transformers' in-memory name of checkpoint tensor `name`."""
    ours, theirs = TEXT_ENCODER
    return theirs + name[len(ours):] if family == "t5gemma2" and name.startswith(ours) else name


# ---------------------------------------------------------------------------- export

def export_run(run_dir, out, train_rows, val_rows, *, data_sha256: str, teacher=None, data_source=None,
               data_field="text") -> dict:
    """Write the handover directory `out` for the checkpoint of `run_dir` (a `minencdec train`
    run). The rows must be the run's (packed and split as train packed them) and `data_sha256`
    the digest of their text; `teacher` the run's teacher for prefixlm-kd. Everything is read and
    checked before `out` is written; `out` must be missing or empty. `data_source` (the text's
    path, None for Shakespeare) and `data_field` are recorded for the way back. Returns handover.json."""
    run_dir = Path(run_dir)
    check_new_directory(out)
    with locked(run_dir):
        state = exportable_state(run_dir)
        settings, ckpt = state["settings"], run_dir / CHECKPOINT_DIR
        kd = settings["objective"] == "prefixlm-kd"
        model = load_pretrained(ckpt, settings["dtype"], expect="t5gemma")
        tok = tk.Tokenizer.load(ckpt)
        _same(ckpt, "model", settings, model_settings(model), "the checkpoint's model")
        _same(ckpt, "tokenizer", settings, {"tokenizer_sha256": digest_bytes(tok.serialized())}, "tokenizer.model")
        _same(ckpt, "data", settings, {"data_sha256": data_sha256, "seq_len": int(np.shape(train_rows)[1])},
              "--data: the text of this run, packed to its --seq-len")
        if kd and teacher is None:
            raise HandoverError(f"{ckpt}: the run distils from a teacher (prefixlm-kd): give --teacher DIR, "
                                f"the decoder-only model whose weights have sha256 {settings.get('teacher_sha256')}")
        if kd:
            _same(ckpt, "teacher", settings, {"teacher_sha256": digest_params(teacher.params)}, "--teacher")
        torch = _require("torch")
        cfg = train_config_of(state["train_config"], ckpt)
        opt = make_optimizer(model, cfg)
        step, history = load_checkpoint(run_dir, model, opt, cfg, settings)
        order = torch_order(ckpt, model)
    handover = _describe(model, opt, cfg, step, history, order, state)
    handover["data"].update(source=None if data_source is None else str(Path(data_source).resolve()), field=data_field)
    optimizer_pt, handover["scheduler_state_dict"] = _torch_states(torch, handover, opt, cfg, step)
    files = {TORCH_OPTIMIZER_FILE: optimizer_pt,
             OPTIMIZER_FILE: _moment_bytes(opt, handover["optimizer"]["checkpoint_names"]),
             DATA_FILE: _rows_bytes(train_rows, val_rows), tk.TOKENIZER_FILE: tok.serialized(),
             HANDOVER_FILE: _json(handover)}
    target = check_new_directory(out)                       # again: nothing appeared there meanwhile
    write_directory(target, lambda d: _fill(d, model, files, teacher if kd else None))
    return handover


def check_new_directory(out) -> Path:
    """Where a new handover directory may be written (`out` missing or empty: nothing is replaced)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise HandoverError(f"{out} already exists and is {'not empty' if path.is_dir() else 'not a directory'}: "
                            "export-torch writes a new directory and replaces nothing; choose another --out")
    return check_destination(path)          # a symlink followed; an interrupted save's leftovers


def exportable_state(run_dir) -> dict:
    """trainer_state.json of a run export_run can hand over (a `minencdec train` run), else an error."""
    run_dir = Path(run_dir)
    recover_checkpoint(run_dir / CHECKPOINT_DIR)        # an interrupted save's complete copy, put back
    if not (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
        raise HandoverError(f"{run_dir} holds no checkpoint ({CHECKPOINT_DIR}/{STATE_FILE} is missing): "
                            "nothing to export")
    state = read_state(run_dir)
    settings = state["settings"]
    objective = settings.get("objective")
    if objective not in OBJECTIVES:
        raise HandoverError(f"{run_dir / CHECKPOINT_DIR}: not a `minencdec train` run (objective "
                            f"{objective!r}); export-torch hands over encoder-decoder runs trained with "
                            f"{', '.join(OBJECTIVES)}")
    missing = [k for k in ("batch_size", "seed", "seq_len", "data_sha256", "tokenizer_sha256", "dtype")
               if k not in settings]
    if missing:
        raise HandoverError(f"{run_dir / CHECKPOINT_DIR}: trainer_state.json does not record {missing}; "
                            "runs saved by an older minencdec cannot be handed over exactly")
    return state


def train_config_of(saved: dict, where) -> TrainConfig:
    """The TrainConfig a trainer_state.json recorded (freeze is saved as a list); every field
    must be there, or the continuation would silently use a default."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(saved) != fields:
        raise HandoverError(f"{where}: the recorded train_config lacks {sorted(fields - set(saved))} and has "
                            f"{sorted(set(saved) - fields)} that this minencdec does not know")
    try:
        return TrainConfig(**{k: tuple(v) if k == "freeze" else v for k, v in saved.items()})
    except (TypeError, ValueError) as e:
        raise HandoverError(f"{where}: the recorded train_config is not valid ({e})") from None


def _same(where, what, saved: dict, given: dict, source: str) -> None:
    diffs = [f"{k} {saved.get(k)!r} (the run) != {v!r} ({source})" for k, v in given.items() if saved.get(k) != v]
    if diffs:
        raise HandoverError(f"{where}: the {what} given is not the run's: {'; '.join(diffs)}")


def torch_order(config_dir, model) -> list[str]:
    """The torch names of `model`'s parameters in transformers' named_parameters() order, read
    from a model transformers builds on the meta device (no memory, no weights)."""
    torch, transformers = _require("torch"), _require("transformers")
    config = transformers.AutoConfig.from_pretrained(str(config_dir))
    with torch.device("meta"):
        module = transformers.AutoModelForSeq2SeqLM.from_config(config)
    names = [n for n, _ in module.named_parameters()]
    ours = {torch_name(n, model.config.family): n for n in model.params}
    missing = sorted(set(ours) - set(names))
    strays = [n for n in names if n not in ours and not n.startswith(VISION)]      # T5Gemma 2: the vision tower
    if missing or strays:
        raise HandoverError(f"transformers {transformers.__version__} names the parameters of {config_dir} "
                            f"otherwise: it lacks {missing[:5]} and has {strays[:5]} that minencdec does not train")
    return [n for n in names if n in ours]


def _describe(model, opt, cfg, step, history, order, state) -> dict:
    family = model.config.family
    names = {torch_name(n, family): n for n in model.params}
    groups = [{"weight_decay": wd, "params": [n for n in order if opt.decays[names[n]] == decays]}
              for decays, wd in ((True, cfg.weight_decay), (False, 0.0))]
    groups = [g for g in groups if g["params"]]
    settings = state["settings"]
    return {
        "format": HANDOVER_FORMAT, "step": step, "written_by": "minencdec export-torch",
        "model": {"family": family, "dtype": str(np.dtype(model.dtype)),
                  "decoder_bos_id": model.config.decoder.bos_token_id,        # shift_right(labels, bos, pad):
                  "decoder_pad_id": model.config.decoder.pad_token_id},       # the decoder's inputs
        "optimizer": {"class": "torch.optim.AdamW", "betas": [opt.beta1, opt.beta2], "eps": opt.eps,
                      "weight_decay": opt.weight_decay, "clip": cfg.clip,
                      "groups": groups,
                      "param_steps": {torch_name(n, family): s["step"] for n, s in opt.state.items()},
                      "checkpoint_names": {n: names[n] for g in groups for n in g["params"]}},
        "schedule": {"kind": cfg.schedule, "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                     "total_steps": cfg.steps},
        "freeze": {"names": [torch_name(n, family) for n in cfg.freeze], "steps": cfg.freeze_steps},
        "data": {"file": DATA_FILE, "batch_size": settings["batch_size"], "seed": settings["seed"],
                 "seq_len": settings["seq_len"], "data_sha256": settings["data_sha256"]},
        "objective": {"name": settings["objective"], "temperature": settings.get("temperature", 1.0),
                      "alpha": settings.get("alpha", 1.0),
                      "teacher": TEACHER_DIR if settings["objective"] == "prefixlm-kd" else None},
        "history": history,
        "minencdec": {"train_config": state["train_config"], "settings": settings},
    }


def _torch_states(torch, handover, opt, cfg, step) -> tuple[bytes, dict]:
    """(torch.save of the AdamW state_dict, the LambdaLR state_dict): both made by torch itself
    over placeholder parameters, so every key is the one this torch writes and reads."""
    groups = handover["optimizer"]["groups"]
    placeholders = [{"params": [torch.empty(0, requires_grad=True) for _ in g["params"]],
                     "weight_decay": g["weight_decay"], "initial_lr": cfg.lr} for g in groups]
    torch_opt = torch.optim.AdamW(placeholders, lr=cfg.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    lr_at = cfg.lr_schedule()
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda e: lr_at(e) / cfg.lr, last_epoch=step - 1)
    state = torch_opt.state_dict()
    names = handover["optimizer"]["checkpoint_names"]
    ids = [n for g in groups for n in g["params"]]
    for i, name in enumerate(ids):
        s = opt.state.get(names[name])
        if s is not None:                               # not trained yet (a freeze): no state, as in torch
            state["state"][i] = {"step": torch.tensor(float(s["step"]), dtype=torch.float32),
                                 **{k: torch.from_numpy(np.ascontiguousarray(s[k])) for k in MOMENTS}}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), scheduler.state_dict()


def _moment_bytes(opt, checkpoint_names) -> bytes:
    return save({f"{k}/{t}": opt.state[n][k] for t, n in checkpoint_names.items() if n in opt.state for k in MOMENTS})


def _rows_bytes(train_rows, val_rows) -> bytes:
    return save({"train_rows": np.ascontiguousarray(train_rows, dtype=np.int32),
                 "val_rows": np.ascontiguousarray(val_rows, dtype=np.int32)})


def _fill(directory: Path, model, files: dict, teacher) -> None:
    """The handover directory's content: the model (one safetensors file), the files, the teacher."""
    write_file(directory / CONFIG_FILE, _json(model.hf_config()))
    tags = {n: SAVE_TAGS[a.dtype.name] for n, a in model.params.items()}
    write_safetensors(directory / WEIGHTS_FILE, model.params, list(model.params), tags)
    for name, data in files.items():
        write_file(directory / name, data)
    if teacher is not None:
        save_tensors(directory / TEACHER_DIR, teacher.params, teacher.hf_config())


def _json(value) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


# ---------------------------------------------------------------------------- reading back

def read_handover(directory) -> dict:
    """handover.json of a handover directory, checked field by field (errors name the file)."""
    file = Path(directory) / HANDOVER_FILE
    if not file.is_file():
        raise HandoverError(f"{file} is missing: {directory} is not a handover directory "
                            "(minencdec export-torch or examples/continue_in_pytorch.py writes one)")
    try:
        h = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HandoverError(f"{file}: damaged, not valid JSON ({e})") from None
    if not isinstance(h, dict) or h.get("format") != HANDOVER_FORMAT:
        found = h.get("format") if isinstance(h, dict) else type(h).__name__
        raise HandoverError(f"{file}: unknown format {found!r}, expected {HANDOVER_FORMAT!r}")
    step = h.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise HandoverError(f"{file}: damaged, 'step' is not a step number ({step!r})")
    for key in ("optimizer", "schedule", "freeze", "data", "objective", "history", "minencdec"):
        if not isinstance(h.get(key), dict):
            raise HandoverError(f"{file}: damaged, '{key}' is not an object")
    opt, saved = h["optimizer"], h["minencdec"]
    for key, value, kind in (("optimizer.groups", opt.get("groups"), list),
                             ("optimizer.param_steps", opt.get("param_steps"), dict),
                             ("optimizer.checkpoint_names", opt.get("checkpoint_names"), dict),
                             ("minencdec.train_config", saved.get("train_config"), dict),
                             ("minencdec.settings", saved.get("settings"), dict),
                             ("history.train", h["history"].get("train"), list),
                             ("history.val", h["history"].get("val"), list)):
        if not isinstance(value, kind):
            raise HandoverError(f"{file}: damaged, '{key}' is not a {kind.__name__}")
    late = {n: t for n, t in opt["param_steps"].items() if not isinstance(t, int) or not 0 < t <= step}
    if late:
        raise HandoverError(f"{file}: damaged, AdamW step counts {dict(list(late.items())[:3])} are not in "
                            f"1..{step} (the run's step)")
    unrecorded = [k for k in ("dtype", "tokenizer_sha256", "model_config_sha256") if k not in saved["settings"]]
    if unrecorded:
        raise HandoverError(f"{file}: damaged, 'minencdec.settings' does not record {unrecorded}")
    return h


def batches(directory, handover=None) -> Seq2SeqTask:
    """The run's data from the handover directory: `.batch(step)` is the batch minencdec reads at
    `step` (rows, input_ids, attention_mask, labels), `.eval_batches()` the validation batches.
    prefixlm-kd reads what prefixlm reads; only its loss differs."""
    h = handover or read_handover(directory)
    d, objective = h["data"], h["objective"]["name"]
    rows = load_file(str(Path(directory) / d["file"]))
    special = tk.Tokenizer.load(directory) if objective == "ul2" else None
    return Seq2SeqTask("ul2" if objective == "ul2" else "prefixlm", rows["train_rows"], rows["val_rows"],
                       d["batch_size"], d["seed"], special=special)


def import_run(directory, run_dir) -> int:
    """Make `run_dir` a minencdec run whose checkpoint is the handover directory's state, so that
    `minencdec train --resume` continues it. Everything is read and checked first; a run_dir that
    already holds a run is refused. Returns the step."""
    directory, run_dir = Path(directory), Path(run_dir)
    h = read_handover(directory)
    _refuse_a_run(run_dir)
    settings = h["minencdec"]["settings"]
    cfg = train_config_of(h["minencdec"]["train_config"], directory / HANDOVER_FILE)
    model = load_pretrained(directory, settings["dtype"], expect="t5gemma")
    _same(directory / CONFIG_FILE, "model", settings, model_settings(model), "the handed-back model")
    tok = tk.Tokenizer.load(directory)
    _same(directory / tk.TOKENIZER_FILE, "tokenizer", settings,
          {"tokenizer_sha256": digest_bytes(tok.serialized())}, "the handed-back tokenizer")
    opt = make_optimizer(model, cfg)
    try:
        opt.load_state_dict(_minencdec_state(directory, h, model))
    except (KeyError, TypeError, ValueError) as e:
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise HandoverError(f"{directory / OPTIMIZER_FILE}: does not fit this model and optimizer ({detail})") from None
    _require_finite(directory, model, opt)
    with locked(run_dir):                                   # everything is read: now the run is written
        _refuse_a_run(run_dir)
        check_start(run_dir, resume=False)
        save_checkpoint(run_dir, model, opt, h["step"], cfg, h["history"], {tk.TOKENIZER_FILE: tok.serialized()},
                        settings)
    return h["step"]


def _refuse_a_run(run_dir: Path) -> None:
    if (run_dir / CHECKPOINT_DIR).exists():
        raise HandoverError(f"{run_dir} already holds a run: import-torch writes a new run directory and "
                            "replaces nothing; choose another --out")


def _minencdec_state(directory: Path, h: dict, model) -> dict:
    """optim.AdamW.state_dict() of the moments in optimizer.safetensors (torch names)."""
    file, opt = directory / OPTIMIZER_FILE, h["optimizer"]
    try:
        tensors = load_file(str(file))
    except Exception as e:                                # missing, or safetensors' own error type
        raise HandoverError(f"{file}: missing or not a readable safetensors file ({e})") from None
    strange = [key for key in tensors if key.split("/", 1)[0] not in MOMENTS or "/" not in key]
    if strange:
        raise HandoverError(f"{file}: tensors {strange[:5]} are not named exp_avg/NAME or exp_avg_sq/NAME")
    names = opt["checkpoint_names"]
    unknown = sorted(({key.split("/", 1)[1] for key in tensors} | set(opt["param_steps"])) - set(names))
    if unknown:
        raise HandoverError(f"{file}: moments of parameters the run does not train: {unknown[:5]}")
    moments = {}
    for key, array in tensors.items():
        moment, name = key.split("/", 1)
        moments[f"{moment}/{names[name]}"] = array.astype(model.dtype, copy=False)
    return {"tensors": moments,
            "meta": {"format": "minencdec.AdamW/1", "step_count": h["step"],
                     "param_steps": {names[t]: s for t, s in opt["param_steps"].items()},
                     "betas": opt.get("betas"), "eps": opt.get("eps"), "weight_decay": opt.get("weight_decay")}}


def _require_finite(directory, model, opt) -> None:
    """Nothing non-finite is saved (train.py's promise), also when it comes from elsewhere."""
    for name, p in model.params.items():
        arrays = [("the weight", p)] + [(f"AdamW's {k} of", opt.state[name][k]) for k in MOMENTS if name in opt.state]
        for what, array in arrays:
            if not np.isfinite(array).all():
                raise HandoverError(f"{directory}: {what} {name} holds NaN or infinity; nothing non-finite "
                                    "is imported")


# ---------------------------------------------------------------------------- optional packages

def _require(name):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise HandoverError(f"export-torch writes PyTorch's own files and reads transformers' parameter order: "
                            f"it needs {name} (pip install torch transformers; import-torch needs neither)") from None
