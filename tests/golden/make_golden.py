"""Write the golden files: the float64 transformers oracle's outputs on every test case.

Regenerate (needs torch and transformers) from the repository root:

    python tests/golden/make_golden.py            # all files: tests/cases.py GOLDEN and GOLDEN_GEMMA3
    python tests/golden/make_golden.py gemma2_gqa_odd t5gemma2_global_cap   # some of them

Each `<stem>.safetensors` (float64 / int64, safetensors.numpy) holds
- "param.<name>": the parameters (Hugging Face names, tied LM head absent),
- the inputs: "input_ids", "attention_mask", "labels", and for T5Gemma / T5Gemma 2 LM files
  "decoder_input_ids" (= shift_right(labels)) and "decoder_attention_mask" (T5Gemma 2's
  oracle runs without it: transformers' T5Gemma 2 derives no decoder mask),
- the outputs: "logits", "loss" (0-d), "grad.<name>", "encoder_out" (T5Gemma LM),
  "pooled_index" (classification),
and metadata: format_version, case, kind, options, config (transformers config.json JSON),
param_std, transformers_version, torch_version. `tests/cases.py: load_golden(stem)` reads
them; `tests/model/test_oracle.py` (GOLDEN) and `tests/model/test_oracle_gemma3.py`
(GOLDEN_GEMMA3) check them against cases.py and against a live run.

Everything is deterministic: parameters and inputs come from tests/cases.py's seeded
generators, and the oracle runs float64 on CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]       # tests/, repository root

import numpy as np  # noqa: E402

import cases  # noqa: E402
import oracle_hf  # noqa: E402

MAX_FILE_BYTES = 300_000
# A rerun on another machine (or with another thread count) sums some of torch's reductions in
# another order: outputs move by a few ulps (~1e-15 seen). Outputs within this of the stored
# ones keep the stored file, so a rerun does not rewrite every golden file for noise; the live
# tests hold the files to 1e-12, 10x looser.
KEEP_RTOL = 1e-13


def golden_tensors(stem: str):
    """(tensors, metadata) of one golden file, computed live."""
    kind, config, params, inputs, opts = cases.golden_case(stem)
    out = oracle_hf.run_golden(kind, config, params, inputs, opts)
    tensors = {f"param.{k}": np.asarray(v, np.float64) for k, v in params.items()}
    tensors.update({k: np.asarray(v, np.int64) for k, v in inputs.items()})
    tensors["logits"] = out["logits"]
    tensors["loss"] = np.asarray(out["loss"], np.float64)
    tensors.update({f"grad.{k}": v for k, v in out["grads"].items()})
    if "encoder_out" in out:
        tensors["encoder_out"] = out["encoder_out"]
    if "pooled_index" in out:
        tensors["pooled_index"] = np.asarray(out["pooled_index"], np.int64)
    _, case, _ = cases.ALL_GOLDEN[stem]
    meta = {"format_version": cases.GOLDEN_FORMAT_VERSION, "case": case, "kind": kind,
            "options": json.dumps(opts, sort_keys=True), "config": cases.config_json(config),
            "param_std": repr(cases.CASE_STD.get(case, cases.PARAM_STD)), **oracle_hf.versions()}
    return tensors, meta


def _same(key: str, stored: np.ndarray, new: np.ndarray) -> bool:
    """Parameters and inputs exactly equal; outputs within KEEP_RTOL of their largest entry."""
    if stored.dtype != new.dtype or stored.shape != new.shape:
        return False
    if np.array_equal(stored, new):
        return True
    if key.startswith("param.") or key in cases.INPUT_KEYS:
        return False
    scale = max(float(np.max(np.abs(stored), initial=0.0)), np.finfo(np.float64).tiny)
    return bool(np.max(np.abs(stored - new)) <= KEEP_RTOL * scale)


def _unchanged(path: Path, tensors: dict, meta: dict) -> bool:
    """True if `path` already holds these tensors (see _same) and metadata. (safetensors'
    header order is not deterministic, so equal content can differ in bytes: skip such rewrites.)"""
    from safetensors import safe_open
    if not path.exists():
        return False
    with safe_open(str(path), "numpy") as f:
        if f.metadata() != meta or set(f.keys()) != set(tensors):
            return False
        return all(_same(k, f.get_tensor(k), tensors[k]) for k in tensors)


def main(stems: list[str]) -> None:
    from safetensors.numpy import save_file
    for stem in stems or list(cases.ALL_GOLDEN):
        tensors, meta = golden_tensors(stem)
        path = cases.golden_path(stem)
        if _unchanged(path, tensors, meta):
            print(f"{path.relative_to(HERE.parent.parent)}: unchanged")
            continue
        save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(path), metadata=meta)
        path.chmod(0o644)                 # safetensors writes 0600
        size = path.stat().st_size
        print(f"{path.relative_to(HERE.parent.parent)}: {len(tensors)} tensors, {size / 1000:.0f} kB")
        if size > MAX_FILE_BYTES:
            raise SystemExit(f"{path.name} is {size} bytes > {MAX_FILE_BYTES}: shrink the case")


if __name__ == "__main__":
    main(sys.argv[1:])
