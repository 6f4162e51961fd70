"""Generation (minencdec.model.generate) against independent oracles.

1. The cache: at every decoding step the cached logits equal a full forward pass over the
   whole prefix (float64, RTOL_CACHE), both architectures, windows 1-4 shorter than the
   generated length, padded batches. A decoder-only row that is left-padded must give the
   logits of the same prompt *without* padding. Negative controls:
   a cache that forgets the sliding window, and cross-attention cut to the window, fail.
2. Greedy tokens equal transformers' `generate` on the same tiny random models: live when
   torch is installed, and always against `golden/generate_greedy.json`.
   Regenerate it with `python tests/model/test_generate.py` (needs torch and transformers).
3. Sampling: seeded runs repeat, top_k = 1 is greedy, the top-k / top-p filters against a
   brute-force oracle (and transformers' warpers when torch is installed), the sampler's
   frequencies, min_new_tokens, eos padding, streaming.
4. Bad input errors, and the `generate` command.
"""

from __future__ import annotations

import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":          # run as a script (regenerating the golden file): find tests/ helpers
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cases  # noqa: E402
from helpers import assert_close  # noqa: E402
from minencdec.cli import build_parser  # noqa: E402
from minencdec.model import gemma2, t5gemma  # noqa: E402
from minencdec.model import generate as G  # noqa: E402

# Cached and full passes do the same arithmetic on differently shaped arrays (a prompt in
# one block vs one token at a time, masked keys absent vs present with weight 0): they agree
# to ~1e-15; 1e-10 is the bound and still far below any real mistake (>= 1e-3).
RTOL_CACHE = 1e-10
N_STEPS = 12                    # longer than every test window (1 to 4)
EMBED_STD = 0.03                # see gen_params
CASES = list(cases.GEMMA2_CASES) + list(cases.T5GEMMA_CASES)
GOLDEN_FILE = cases.GOLDEN_DIR / "generate_greedy.json"
GOLDEN_VERSION = "1"


# --------------------------------------------------------------------------- models and inputs

def gen_params(case):
    """A case's parameters (cases.py) with the embedding tables shrunk to std EMBED_STD. With
    tied embeddings at std 0.3 a random model predicts the token it was fed and repeats it
    forever; smaller tables give varied greedy sequences, so comparisons see many cache states."""
    params = cases.case_params(case)
    std = cases.CASE_STD.get(case, cases.PARAM_STD)
    return {k: v * (EMBED_STD / std) if k.endswith("embed_tokens.weight") else v for k, v in params.items()}


def build(case, params=None, dtype="float64"):
    cls = t5gemma.T5GemmaModel if case in cases.T5GEMMA_CASES else gemma2.Gemma2Model
    return cls(cases.case_config(case), gen_params(case) if params is None else params, dtype)


def gen_inputs(case):
    """Decoder-only: three prompts of 7 tokens, LEFT-padded by 0, 2 and 4 (as generation needs).
    T5Gemma: cases.py's encoder inputs (no, right and left padding)."""
    if case in cases.T5GEMMA_CASES:
        x = cases.case_inputs(case)
        return x["input_ids"], x["attention_mask"]
    rng = np.random.default_rng(cases.case_seed(case) + 7)
    V, T = cases.case_config(case).vocab_size, 7
    mask = np.ones((3, T), dtype=np.int64)
    for r, pads in enumerate((0, 2, 4)):
        mask[r, :pads] = 0
    return np.where(mask == 1, rng.integers(cases.FIRST_ID, V, (3, T)), cases.PAD), mask


def params_checksum(params):
    """A fingerprint of the parameters, stored in the golden file to catch drift in cases.py."""
    return zlib.crc32(b"".join(np.round(params[k], 12).tobytes() for k in sorted(params)))


# --------------------------------------------------------------------------- 1. the cache

def check_cache_against_full_forward(case, n_steps=N_STEPS, seed=0):
    """Feed random tokens one at a time; after the prompt and after every token compare the
    cached next-token logits with a full forward pass over the whole prefix."""
    model = build(case)
    ids, mask = gen_inputs(case)
    fed = np.random.default_rng(seed).integers(cases.FIRST_ID, 48, (len(ids), n_steps))
    state, logits = G.start(model, ids, mask)
    for n in range(n_steps + 1):
        if isinstance(model, t5gemma.T5GemmaModel):
            dec = np.concatenate([np.full((len(ids), 1), cases.BOS), fed[:, :n]], axis=1)
            full = model.logits(ids, dec, attention_mask=mask)[:, -1]
        else:   # each row alone, without its padding: positions must not count the pads
            full = np.stack([model.logits(np.concatenate([ids[r][mask[r] == 1], fed[r, :n]])[None])[0, -1]
                             for r in range(len(ids))])
        assert_close(f"{case} step {n} logits", logits, full, RTOL_CACHE)
        if n < n_steps:
            logits = G.step(state, fed[:, n])
    return state


@pytest.mark.parametrize("case", CASES)
def test_cached_logits_equal_full_forward(case):
    state = check_cache_against_full_forward(case)
    model = build(case)
    c = model.config.decoder if isinstance(model, t5gemma.T5GemmaModel) else model.config
    fed = N_STEPS + (1 if isinstance(model, t5gemma.T5GemmaModel) else 7)
    for i in range(c.num_hidden_layers):       # a sliding layer keeps w - 1 keys, a full one all
        want = fed if c.window(i) is None else min(c.window(i) - 1, fed)
        assert state.cache.keys[i].shape[2] == want == len(state.cache.slots[i])
    if state.cache.cross is not None:          # cross-attention keeps the whole source
        assert all(k.shape[2] == v.shape[2] == gen_inputs(case)[0].shape[1] for k, v in state.cache.cross)


def test_negative_control_cache_without_window_fails(monkeypatch):
    """A sliding layer treated as full (no window, no trim) must fail the check."""
    monkeypatch.setattr(G, "_sliding_window", lambda c, i: None)
    with pytest.raises(AssertionError):
        check_cache_against_full_forward("gqa_odd")
    with pytest.raises(AssertionError):
        check_cache_against_full_forward("balanced")


def test_positions_shifted_by_the_padding_give_the_same_logits(monkeypatch):
    """Not a negative control: RoPE scores depend only on position differences, so counting the
    pads (a constant shift per row) changes nothing but rounding. transformers' cumsum positions
    are kept to match its rounding, not because the other choice would be wrong."""
    monkeypatch.setattr(G, "prompt_positions", lambda mask: np.broadcast_to(np.arange(mask.shape[1]), mask.shape))
    check_cache_against_full_forward("gqa_odd")


def test_negative_control_cross_attention_cut_to_window_fails(monkeypatch):
    """Cross-attention that inherits the decoder's sliding window (the bug transformers shipped)."""
    def windowed(cross_mask, w=2):
        return G.Mask(causal=False, window=w, key_mask=cross_mask)     # only the first w + 1 keys
    monkeypatch.setattr(G, "_cross_key_mask", windowed)
    with pytest.raises(AssertionError):
        check_cache_against_full_forward("unbalanced")


# --------------------------------------------------------------------------- 2. greedy == transformers

def hf_generate(case, ids, mask, max_new_tokens, eos_token_id, min_new_tokens, use_cache):
    """transformers' greedy `generate` (eager, float64 made exact) on gen_params(case)."""
    import torch

    import oracle_hf
    from transformers import Gemma2ForCausalLM, T5GemmaForConditionalGeneration
    config = cases.case_config(case)
    if case in cases.T5GEMMA_CASES:
        model = oracle_hf._build(T5GemmaForConditionalGeneration, oracle_hf.t5gemma_hf_config(config),
                                 gen_params(case), "float64")
    else:
        model = oracle_hf._build(Gemma2ForCausalLM, oracle_hf.gemma2_hf_config(config), gen_params(case),
                                 "float64")
    with oracle_hf.float64_exact(), torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             eos_token_id=eos_token_id, pad_token_id=cases.PAD, use_cache=use_cache)
    return out.numpy()


# transformers' cached generate is wrong for a sliding window of 1 (mixed_types): its sliding
# cache keeps `keys[:, :, -window + 1:]`, which for window 1 is `[-0:]`, i.e. every key, while
# its mask assumes window - 1 of them. Its uncached generate is right, so that case uses it.
HF_USE_CACHE = {"mixed_types": False}


def make_golden():
    """Write golden/generate_greedy.json from transformers. Per case three runs: the config's
    eos (1); an eos that the oracle's first run produced at step 3 of row 0 (so rows stop early
    and get padded); that eos again with min_new_tokens = 6."""
    import torch
    import transformers
    runs = {}
    for case in CASES:
        ids, mask = gen_inputs(case)
        use_cache = HF_USE_CACHE.get(case, True)
        first = hf_generate(case, ids, mask, N_STEPS, 1, 0, use_cache)
        eos = int(first[0, first.shape[1] - N_STEPS + 3])
        for name, eos_id, min_new in ((case, 1, 0), (f"{case}_eos", eos, 0), (f"{case}_min_new", eos, 6)):
            out = first if name == case else hf_generate(case, ids, mask, N_STEPS, eos_id, min_new, use_cache)
            runs[name] = {"case": case, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                          "max_new_tokens": N_STEPS, "eos_token_id": eos_id, "min_new_tokens": min_new,
                          "hf_use_cache": use_cache, "params_checksum": params_checksum(gen_params(case)),
                          "tokens": out.tolist()}
    doc = {"format_version": GOLDEN_VERSION, "transformers_version": transformers.__version__,
           "torch_version": torch.__version__, "embed_std": EMBED_STD,
           "about": "greedy generate() of transformers (eager, float64_exact) on tests/cases.py models "
                    "(embedding std EMBED_STD); written by tests/model/test_generate.py:make_golden",
           "runs": runs}
    text = json.dumps(doc, indent=1)
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    GOLDEN_FILE.write_text(text + "\n")                      # one token row per line


def golden():
    if not GOLDEN_FILE.exists():
        raise FileNotFoundError(f"{GOLDEN_FILE} missing: run python tests/model/test_generate.py")
    doc = json.loads(GOLDEN_FILE.read_text())
    assert doc["format_version"] == GOLDEN_VERSION, "stale golden file: run python tests/model/test_generate.py"
    return doc["runs"]


def ours(run):
    model = build(run["case"])
    return G.generate(model, np.array(run["input_ids"]), run["max_new_tokens"], np.array(run["attention_mask"]),
                      eos_token_id=run["eos_token_id"], min_new_tokens=run["min_new_tokens"])


RUNS = sorted(golden()) if GOLDEN_FILE.exists() else ["golden file missing"]   # the tests then fail


@pytest.mark.parametrize("name", RUNS)
def test_greedy_equals_golden(name):
    run = golden()[name]
    assert run["params_checksum"] == params_checksum(gen_params(run["case"])), \
        "cases.py parameters changed: regenerate with python tests/model/test_generate.py"
    got = ours(run)
    assert got.tolist() == run["tokens"], f"{name}:\n{got}\nwant\n{np.array(run['tokens'])}"


@pytest.mark.parametrize("name", RUNS)
def test_greedy_equals_transformers_live(name):
    pytest.importorskip("torch")
    run = golden()[name]
    ids, mask = np.array(run["input_ids"]), np.array(run["attention_mask"])
    want = hf_generate(run["case"], ids, mask, run["max_new_tokens"], run["eos_token_id"],
                       run["min_new_tokens"], HF_USE_CACHE.get(run["case"], True))
    got = ours(run)
    assert got.shape == want.shape and (got == want).all(), f"{name}:\n{got}\nwant\n{want}"


def test_golden_runs_stop_early_and_pad():
    """The golden file really exercises eos: some row stops early and is padded afterwards."""
    padded = [n for n, r in golden().items() if r["eos_token_id"] != 1 and
              any(cases.PAD in row[-N_STEPS:] for row in r["tokens"])]
    assert len(padded) >= 4, padded


def test_transformers_window_1_cache_still_differs():
    """Documents why HF_USE_CACHE exists; fails once transformers fixes its window-1 cache."""
    pytest.importorskip("torch")
    ids, mask = gen_inputs("mixed_types")
    cached = hf_generate("mixed_types", ids, mask, N_STEPS, 1, 0, True)
    uncached = hf_generate("mixed_types", ids, mask, N_STEPS, 1, 0, False)
    assert (cached != uncached).any(), "transformers fixed its window-1 cache: drop HF_USE_CACHE"


# --------------------------------------------------------------------------- 3. sampling

def test_seeded_sampling_is_reproducible():
    model, (ids, mask) = build("gqa_odd"), gen_inputs("gqa_odd")
    kw = dict(do_sample=True, temperature=1.5, top_p=0.95, seed=7, eos_token_id=-1)
    a, b = G.generate(model, ids, N_STEPS, mask, **kw), G.generate(model, ids, N_STEPS, mask, **kw)
    c = G.generate(model, ids, N_STEPS, mask, **{**kw, "seed": 8})
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("case", ["gqa_odd", "balanced"])
def test_top_k_1_is_greedy(case):
    model, (ids, mask) = build(case), gen_inputs(case)
    greedy = G.generate(model, ids, N_STEPS, mask)
    for temperature, top_p in ((0.5, None), (3.0, 0.3)):
        sampled = G.generate(model, ids, N_STEPS, mask, do_sample=True, top_k=1, temperature=temperature,
                             top_p=top_p, seed=1)
        assert (sampled == greedy).all()


def brute_top_p(logits, p):
    """The smallest set of most likely tokens with mass >= p, by trying k = 1, 2, ..."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    for k in range(1, len(probs) + 1):
        if sum(probs[i] for i in ranked[:k]) >= p:
            return set(ranked[:k])
    return set(ranked)


def test_top_p_keeps_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    for _ in range(200):
        V = int(rng.integers(2, 40))
        logits = rng.normal(0, rng.choice([0.3, 2.0, 6.0]), (1, V))
        p = float(rng.choice([rng.uniform(0.01, 0.999), 1.0]))
        kept = set(np.flatnonzero(np.isfinite(G.top_p_filter(logits, p)[0])))
        assert kept == brute_top_p(logits[0], p), (p, logits)
    probs = np.array([[0.5, 0.3, 0.2]])                        # a hand example
    for p, n in ((0.45, 1), (0.75, 2), (0.85, 3), (1.0, 3)):
        assert np.isfinite(G.top_p_filter(np.log(probs), p)).sum() == n


def test_top_k_keeps_k_largest():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 30))
    for k in (1, 3, 30, 100):
        kept = np.isfinite(G.top_k_filter(logits, k))
        want = np.zeros_like(kept)
        for r in range(5):
            want[r, np.argsort(-logits[r])[:k]] = True
        assert (kept == want).all()


def test_filters_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (50, 40))
    for p in (0.1, 0.5, 0.9, 0.99):
        want = np.isfinite(TopPLogitsWarper(p)(None, torch.from_numpy(logits)).numpy())
        assert (np.isfinite(G.top_p_filter(logits, p)) == want).all(), p
    for k in (1, 5, 39):
        want = np.isfinite(TopKLogitsWarper(k)(None, torch.from_numpy(logits)).numpy())
        assert (np.isfinite(G.top_k_filter(logits, k)) == want).all(), k


def test_sampler_frequencies_follow_the_filtered_softmax():
    """40000 draws from one row: each token's frequency within 5 standard errors."""
    logits = np.tile(np.log([[0.1, 0.4, 0.2, 0.3]]), (40000, 1))
    for kw, probs in (({}, [0.1, 0.4, 0.2, 0.3]), ({"top_k": 2}, [0, 4 / 7, 0, 3 / 7]),
                      ({"temperature": 0.5}, np.array([1, 16, 4, 9]) / 30),
                      ({"top_p": 0.6}, [0, 4 / 7, 0, 3 / 7])):
        kw = {"temperature": 1.0, "top_k": None, "top_p": None, **kw}
        tokens = G.choose(logits, True, kw["temperature"], kw["top_k"], kw["top_p"], np.random.default_rng(3))
        freq = np.bincount(tokens, minlength=4) / len(tokens)
        se = np.sqrt(np.array(probs) * (1 - np.array(probs)) / len(tokens)) + 1e-12
        assert (np.abs(freq - probs) <= 5 * se).all(), (kw, freq, probs)


def test_min_new_tokens_and_eos_padding():
    model, (ids, mask) = build("gqa_odd"), gen_inputs("gqa_odd")
    first = G.generate(model, ids[:1], 1)[0, -1]              # make the first greedy token the eos
    short = G.generate(model, ids[:1], N_STEPS, eos_token_id=first)
    assert short.shape == (1, ids.shape[1] + 1)               # stopped at once
    held = G.generate(model, ids[:1], N_STEPS, eos_token_id=first, min_new_tokens=5)
    assert first not in held[0, ids.shape[1]:ids.shape[1] + 5]
    sampled = G.generate(model, ids, N_STEPS, mask, eos_token_id=first, min_new_tokens=4, do_sample=True,
                         seed=0, temperature=0.7)
    assert not (sampled[:, ids.shape[1]:ids.shape[1] + 4] == first).any()
    for row in sampled[:, ids.shape[1]:]:                     # after eos only pad
        hits = np.flatnonzero(row == first)
        if hits.size:
            assert (row[hits[0] + 1:] == cases.PAD).all()


def test_stream_sees_every_step():
    for case in ("small_caps", "mqa_caps"):
        model, (ids, mask) = build(case), gen_inputs(case)
        seen = []
        out = G.generate(model, ids, 6, mask, stream=lambda t: seen.append(t.copy()))
        assert (np.stack(seen, axis=1) == out[:, -6:]).all()


def test_float32_model_generates_like_float64():
    """The float32 path runs and picks the same greedy tokens on a short run."""
    ids, mask = gen_inputs("gqa_odd")
    a = G.generate(build("gqa_odd"), ids, 4, mask)
    b = G.generate(build("gqa_odd", dtype="float32"), ids, 4, mask)
    assert (a == b).all()


# --------------------------------------------------------------------------- 4. bad input and the command

@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=np.zeros((1, 0), dtype=np.int64)), "empty"),
    (dict(input_ids=[[]]), "empty"),
    (dict(input_ids=np.full((1, 65), 5)), "max_position_embeddings"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=0, do_sample=True), "top_k"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(input_ids=[[5, 6, 0]], attention_mask=[[1, 1, 0]]), "LEFT-padded"),
    (dict(input_ids=[[0, 0]], attention_mask=[[0, 0]]), "all padding"),
    (dict(input_ids=[[5, 99]]), "outside the vocabulary"),
])
def test_bad_input_errors(kwargs, message):
    model = build("gqa_odd")
    args = {"input_ids": [[2, 5, 6]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        G.generate(model, **args)


def test_t5gemma_bad_input_and_wrong_model():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        G.generate(build("balanced"), np.full((1, 65), 5))
    with pytest.raises(TypeError, match="Gemma2Model or a T5GemmaModel"):
        G.generate(object(), [[2, 5]])


def run_cli(argv):
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_with_prompt_ids_and_missing_tokenizer(tmp_path, capsys):
    model = build("gqa_odd")
    model.save_pretrained(tmp_path / "m")
    assert run_cli(["generate", "--model", str(tmp_path / "m"), "--prompt-ids", "2 17 9", "--greedy",
                    "--max-new-tokens", "5", "--dtype", "float64"]) == 0
    want = G.generate(model, [[2, 17, 9]], 5)[0, 3:]
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == [t for t in want.tolist() if t not in (cases.PAD, cases.EOS)]
    with pytest.raises(ValueError, match="--prompt-ids"):
        run_cli(["generate", "--model", str(tmp_path / "m"), "--prompt", "hello"])


def test_cli_streams_text_with_a_tokenizer(tmp_path, capsys):
    spm = pytest.importorskip("sentencepiece")
    import io
    text = ["the quick brown fox jumps over the lazy dog", "a tiny model says hello world",
            "encoder decoder gemma reads the input once"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=proto, vocab_size=48, pad_id=0,
                                   eos_id=1, bos_id=2, unk_id=3, model_type="bpe", minloglevel=2)
    for case in ("mixed_types", "balanced"):
        d = tmp_path / case
        build(case).save_pretrained(d)
        (d / "tokenizer.model").write_bytes(proto.getvalue())
        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        (d / "prompts.txt").write_text("hello the fox\na tiny model\n")
        assert run_cli(["generate", "--model", str(d), "--input-file", str(d / "prompts.txt"),
                        "--max-new-tokens", "6", "--seed", "0", "--temperature", "0.8"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 2
        prompt = [2] + sp.encode("hello the fox")
        ids = G.generate(build(case, dtype="float32"), [prompt], 6, do_sample=True, seed=0, temperature=0.8)
        new = [t for t in ids[0, len(prompt) if case == "mixed_types" else 1:].tolist() if t > 1]
        assert lines[0] == sp.decode(new)


if __name__ == "__main__":
    make_golden()
    print(f"wrote {GOLDEN_FILE}")
