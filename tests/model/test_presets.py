"""Parameter counts of the named sizes against numbers that do not come from our formula.

1. The published counts: the T5Gemma paper's encoder-decoder sizes (S-S ... 9B-2B) and
   Gemma 2 2B, and Gemma 3 270M (268,098,176, the count of the released checkpoint).
2. With torch: transformers' own models (Gemma2ForCausalLM, Gemma3ForCausalLM,
   T5GemmaForConditionalGeneration, T5Gemma2ForConditionalGeneration) built from our
   configs on the meta device (no memory), counting each parameter once (tied ones are one
   parameter in torch too) and leaving out T5Gemma 2's vision tower, which minencdec does
   not hold.
Negative control: a T5Gemma 2 count that forgot the shared table would count it twice.
"""

import pytest

from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import PRESETS, num_parameters

P = PRESETS
PUBLISHED = {
    "S-S": (T5GemmaConfig(P["small"], P["small"]), 312_517_632),
    "B-B": (T5GemmaConfig(P["base"], P["base"]), 591_490_560),
    "L-L": (T5GemmaConfig(P["large"], P["large"]), 1_241_761_792),
    "XL-XL": (T5GemmaConfig(P["xl"], P["xl"]), 3_766_980_608),
    "2B-2B": (T5GemmaConfig(P["gemma2-2b"], P["gemma2-2b"]), 5_596_853_760),
    "9B-2B": (T5GemmaConfig(P["gemma2-9b"], P["gemma2-2b"]), 12_292_375_296),
    "gemma2-2b": (P["gemma2-2b"], 2_614_341_888),
    "gemma3-270m": (P["gemma3-270m"], 268_098_176),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_counts(name):
    config, want = PUBLISHED[name]
    assert num_parameters(config) == want


def _torch_count(config):
    torch = pytest.importorskip("torch")
    import transformers
    with torch.device("meta"):
        if isinstance(config, T5GemmaConfig):
            hf = config.to_hf_dict()
            if config.family == "t5gemma2":
                model = transformers.T5Gemma2ForConditionalGeneration(transformers.T5Gemma2Config(**hf))
            else:
                model = transformers.T5GemmaForConditionalGeneration(transformers.T5GemmaConfig(**hf))
        elif config.family == "gemma3":
            hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
            model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf))
        else:
            model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**config.to_hf_dict()))
    return sum(p.numel() for name, p in model.named_parameters()
               if "vision_tower" not in name and "multi_modal_projector" not in name)


SIZES = {name: P[name] for name in ("small", "gemma2-2b", "gemma3-270m", "gemma3-1b", "gemma3-4b")}
SIZES.update({"T5Gemma S-S": T5GemmaConfig(P["small"], P["small"]),
              "T5Gemma 2 270M-270M": T5GemmaConfig(P["gemma3-270m"], P["gemma3-270m"]),
              "T5Gemma 2 1B-1B": T5GemmaConfig(P["gemma3-1b"], P["gemma3-1b"]),
              "T5Gemma 2 4B-4B": T5GemmaConfig(P["gemma3-4b"], P["gemma3-4b"])})


@pytest.mark.parametrize("name", SIZES)
def test_counts_equal_transformers_own_models(name):
    assert num_parameters(SIZES[name]) == _torch_count(SIZES[name])


def test_negative_control_a_double_counted_table_is_caught():
    pair = SIZES["T5Gemma 2 270M-270M"]
    wrong = num_parameters(pair.encoder) + num_parameters(pair.decoder)     # two tables, no eoi
    assert wrong != _torch_count(pair)
