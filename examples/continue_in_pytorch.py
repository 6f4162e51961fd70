"""Continue a minencdec training run in PyTorch, exactly where it stopped.

    minencdec export-torch runs/t5 --out handover --data corpus.txt         # on the laptop
    accelerate launch examples/continue_in_pytorch.py handover --out handover-2 [--steps K]
    minencdec import-torch handover-2 --out runs/t5-back                     # and back, if you like

The handover directory (documented in minencdec/training/handover.py) holds the model, AdamW's
state as torch saves it, the schedule, the packed token rows with the run's seed and batch size,
and the objective. This script rebuilds each and trains on with PrefixLM, PrefixLM plus
distillation from the teacher, or UL2. Its own requirements: torch, transformers and accelerate
(and minencdec, whose code cuts the batches, so they are the batches the run would have read).

On several processes (DDP: `accelerate launch --multi_gpu`, or on CPUs `ACCELERATE_USE_CPU=true
torchrun --nproc_per_node 2`) each process takes its share of every batch's rows. Each loss is a
sum over the process's tokens divided by the whole batch's token count, times the number of
processes: DDP averages the gradients, so their mean is the gradient of the run's loss, a mean
over the whole batch's tokens. FSDP shards the optimizer state, so there the state must be loaded
and saved through torch.distributed.checkpoint instead of optimizer.pt; this script does not.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from minencdec.model.t5gemma import shift_right
from minencdec.training.handover import batches, read_handover
from minencdec.training.optim import warmup_cosine, warmup_inverse_sqrt

IGNORE = -100
MOMENTS = ("exp_avg", "exp_avg_sq")


def lr_lambda(schedule):
    """LambdaLR's factor: minencdec's learning rate of update e, divided by the peak."""
    s = schedule
    lr_at = (warmup_cosine(s["lr"], s["warmup_steps"], s["total_steps"], s["min_lr"]) if s["kind"] == "cosine"
             else warmup_inverse_sqrt(s["lr"], s["warmup_steps"]))
    return lambda e: lr_at(e) / s["lr"]


def load_model(directory, h):
    """The model, and AdamW and LambdaLR restored to the handed-over step."""
    model = AutoModelForSeq2SeqLM.from_pretrained(directory, dtype=getattr(torch, h["model"]["dtype"]),
                                                  attn_implementation="eager")     # eager: the softcaps
    named, o = dict(model.named_parameters()), h["optimizer"]
    trained = {n for g in o["groups"] for n in g["params"]}
    for name, p in named.items():
        p.requires_grad_(name in trained)            # T5Gemma 2's vision tower is in no group
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in g["params"]], "weight_decay": g["weight_decay"]}
                                   for g in o["groups"]], lr=h["schedule"]["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(h["schedule"]))
    # optimizer.pt is the handover's one pickle; weights_only: torch's loader of tensors and plain values
    optimizer.load_state_dict(torch.load(Path(directory) / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(h["scheduler_state_dict"])      # after the optimizer's: torch's order
    return model, optimizer, scheduler


def loss_sum(logits, labels, teacher_logits, objective):
    """The loss summed over this process's labelled tokens, as minencdec defines it: cross-entropy,
    or alpha T^2 CE(softmax(teacher / T), student / T) + (1 - alpha) CE for distillation."""
    valid = labels != IGNORE
    hard = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    if teacher_logits is None:
        return hard
    T, alpha = objective["temperature"], objective["alpha"]
    soft = -(F.softmax(teacher_logits[valid] / T, -1) * F.log_softmax(logits[valid] / T, -1)).sum()
    return alpha * T * T * soft + (1 - alpha) * hard


def shard(data, step, share, h, device):
    """This process's rows of the batch minencdec reads at `step`: the model's inputs, the labels,
    the packed rows (the teacher's input), and the whole batch's labelled and input token counts."""
    rows, input_ids, attention_mask, labels = data.batch(step)
    bos, pad = h["model"]["decoder_bos_id"], h["model"]["decoder_pad_id"]
    dec = shift_right(labels, bos, pad)                                   # the decoder reads bos + labels
    mine = {k: torch.from_numpy(v[share]).long().to(device) for k, v in dict(
        input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec, decoder_attention_mask=dec != pad,
        labels=labels, rows=rows).items()}
    return mine, int((labels != IGNORE).sum()), int(attention_mask.sum())


def trainable_now(model, step, freeze):
    """The parameters this step updates. During a cross-attention warmup the others lose their
    gradient, so AdamW leaves them alone (no decay, no state), as minencdec does."""
    out = []
    for name, p in model.named_parameters():
        if step < freeze["steps"] and name not in freeze["names"]:
            p.grad = None
        elif p.requires_grad:
            out.append(p)
    return out


def train(args):
    if Path(args.out).exists():                 # say so now, not after the training
        raise SystemExit(f"{args.out} exists: choose a new --out (nothing is overwritten)")
    accelerator = Accelerator()
    directory = Path(args.handover)
    h = read_handover(directory)
    model, optimizer, scheduler = load_model(directory, h)
    objective, teacher = h["objective"], None
    if objective["teacher"]:
        teacher = AutoModelForCausalLM.from_pretrained(directory / objective["teacher"], dtype=model.dtype,
                                                       attn_implementation="eager").requires_grad_(False)
        teacher = accelerator.prepare_model(teacher.eval(), evaluation_mode=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch_size, world, rank = h["data"]["batch_size"], accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise SystemExit(f"a batch of {batch_size} rows does not split over {world} processes")
    share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    data, start = batches(directory, h), h["step"]
    end = start + args.steps if args.steps is not None else h["schedule"]["total_steps"]
    history, clock, tokens = h["history"], time.monotonic(), 0
    for step in range(start, end):
        inputs, count, read = shard(data, step, share, h, accelerator.device)
        labels, rows = inputs.pop("labels"), inputs.pop("rows")
        logits = model(**inputs).logits
        teacher_logits = None
        if teacher is not None:                # the teacher's position k - 1 + t predicts the student's token t
            k, T = inputs["input_ids"].shape[1], labels.shape[1]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=rows).logits[:, k - 1:k - 1 + T]
        summed = loss_sum(logits, labels, teacher_logits, objective)
        accelerator.backward(summed / count * world)
        trainable = trainable_now(accelerator.unwrap_model(model), step, h["freeze"])
        if h["optimizer"]["clip"]:
            accelerator.clip_grad_norm_(trainable, h["optimizer"]["clip"])
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = accelerator.reduce(summed.detach(), "sum").item() / count
        tokens += read + count
        history["train"].append([step + 1, loss, lr, tokens / max(time.monotonic() - clock, 1e-9)])
        accelerator.print(f"step {step + 1}/{end}  loss {loss:.4f}  lr {lr:.3g}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save(Path(args.out), directory, h, accelerator.unwrap_model(model), optimizer, scheduler, end)
        accelerator.print(f"wrote {args.out} at step {end}")


def save(out, directory, h, model, optimizer, scheduler, step):
    """A handover directory again (import-torch reads it; this script continues from it)."""
    out.mkdir(parents=True)                    # refuses an existing directory: nothing is overwritten
    model.save_pretrained(out)
    for name in ("tokenizer.model", h["data"]["file"]):
        shutil.copy2(directory / name, out / name)
    if h["objective"]["teacher"]:
        shutil.copytree(directory / h["objective"]["teacher"], out / h["objective"]["teacher"])
    state = optimizer.state_dict()
    torch.save(state, out / "optimizer.pt")
    ids = [n for g in h["optimizer"]["groups"] for n in g["params"]]
    save_file({f"{k}/{ids[i]}": s[k].contiguous() for i, s in state["state"].items() for k in MOMENTS},
              out / "optimizer.safetensors")
    h = {**h, "step": step, "written_by": "examples/continue_in_pytorch.py",
         "scheduler_state_dict": scheduler.state_dict()}
    h["optimizer"] = {**h["optimizer"], "param_steps": {ids[i]: int(s["step"]) for i, s in state["state"].items()}}
    (out / "handover.json").write_text(json.dumps(h, indent=1) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("handover", help="a handover directory (minencdec export-torch writes one)")
    parser.add_argument("--out", required=True, help="the handover directory to write at the end")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: to the schedule's end)")
    train(parser.parse_args())
