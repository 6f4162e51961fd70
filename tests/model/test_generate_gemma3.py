"""Greedy generation of Gemma 3 and T5Gemma 2 against transformers' `generate`.

The same tiny random models (float64, built from fixed seeds here) in minencdec and in
transformers (eager): the greedy tokens must be identical, sliding caches and all (the
prompts are longer than the windows, one row is padded, T5Gemma 2's input holds the eoi
token). Live when torch is installed, and always against `golden/generate_greedy_gemma3.json`
(regenerate: `python tests/model/test_generate_gemma3.py`; a live test catches a stale file).
Negative control: the same comparison fails for a model whose full layers lose their
linear RoPE scaling.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":          # run as a script (regenerating the golden file): find tests/ helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cases  # noqa: E402
from minencdec.model.config import T5GemmaConfig, gemma3_config  # noqa: E402
from minencdec.model.gemma2 import Gemma2Model  # noqa: E402
from minencdec.model.t5gemma import T5GemmaModel  # noqa: E402

GOLDEN_FILE = cases.GOLDEN_DIR / "generate_greedy_gemma3.json"
FORMAT_VERSION = 1
EOI_ID, NEW = 7, 12


def config(**changes):
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=3, query_pre_attn_scalar=12,
                max_position_embeddings=1024, rope_scaling_factor=4.0)
    return gemma3_config(**{**base, **changes})


def _randomize(model, seed):
    rng = np.random.default_rng(seed)
    for w in model.params.values():
        if w.ndim == 1:
            w[...] = rng.normal(0, 0.3, w.shape)
        else:
            w *= 5.0                                              # sharper distributions: no near-ties
    return model


def models(rope_scaling_factor=4.0):
    lm = _randomize(Gemma2Model.random(config(rope_scaling_factor=rope_scaling_factor), seed=1, dtype="float64"), 11)
    pair = T5GemmaConfig(config(), config(num_hidden_layers=3), eoi_token_index=EOI_ID)
    return lm, _randomize(T5GemmaModel.random(pair, seed=2, dtype="float64"), 12)


def prompts():
    rng = np.random.default_rng(5)
    lm_ids = rng.integers(8, 300, (2, 9))
    lm_ids[1, :2] = 0                                             # left padding
    t5_ids = rng.integers(8, 300, (2, 9))
    t5_ids[0, 3], t5_ids[1, 7:] = EOI_ID, 0
    return lm_ids, t5_ids


def ours(lm, t5):
    lm_ids, t5_ids = prompts()
    return {"gemma3": lm.generate(lm_ids, NEW, eos_token_id=-1).tolist(),
            "t5gemma2": t5.generate(t5_ids, NEW, eos_token_id=-1).tolist()}


def transformers_tokens(lm, t5):
    torch = pytest.importorskip("torch")
    import transformers
    lm_ids, t5_ids = prompts()
    hf = {k: v for k, v in lm.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    g3 = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf)).to(torch.float64).eval()
    g3.load_state_dict({k: torch.from_numpy(v) for k, v in lm.params.items()}, strict=False)
    g3.tie_weights()
    tm = transformers.T5Gemma2ForConditionalGeneration(transformers.T5Gemma2Config(**t5.config.to_hf_dict()))
    tm = tm.to(torch.float64).eval()
    tm.load_state_dict({k.replace("model.encoder.", "model.encoder.text_model.", 1) if k.startswith("model.encoder.")
                        else k: torch.from_numpy(v) for k, v in t5.params.items()}, strict=False)
    tm.tie_weights()
    out = {}
    with torch.no_grad():
        for name, model, ids in (("gemma3", g3, lm_ids), ("t5gemma2", tm, t5_ids)):
            mask = torch.from_numpy((ids != 0).astype(np.int64))
            out[name] = model.generate(torch.from_numpy(ids), attention_mask=mask, max_new_tokens=NEW,
                                       do_sample=False, eos_token_id=None, pad_token_id=0).tolist()
    return out


def make_golden():
    import torch
    import transformers
    doc = {"format_version": FORMAT_VERSION, "transformers_version": transformers.__version__,
           "torch_version": torch.__version__, "tokens": transformers_tokens(*models()),
           "about": "greedy generate() of transformers (eager, float64) on the models of "
                    "tests/model/test_generate_gemma3.py; written by its make_golden"}
    GOLDEN_FILE.write_text(json.dumps(doc, indent=1) + "\n")


def golden():
    doc = json.loads(GOLDEN_FILE.read_text())
    assert doc["format_version"] == FORMAT_VERSION, "stale golden file: run python tests/model/test_generate_gemma3.py"
    return doc["tokens"]


def test_greedy_tokens_equal_transformers_golden():
    assert ours(*models()) == golden()


def test_golden_file_is_current():
    assert transformers_tokens(*models()) == golden()


def test_negative_control_unscaled_rope_generates_other_tokens():
    lm, t5 = models(rope_scaling_factor=1.0)
    assert ours(lm, t5)["gemma3"] != golden()["gemma3"]


if __name__ == "__main__":
    make_golden()
    print(f"wrote {GOLDEN_FILE}")
