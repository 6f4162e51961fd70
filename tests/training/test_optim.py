"""AdamW, freezing, clipping and schedules against torch and closed forms; exact resume."""

import json
import math

import numpy as np
import pytest
from helpers import assert_close

from minencdec.training import optim
from minencdec.training.optim import AdamW, FreezeSchedule, clip_grad_norm, warmup_cosine, warmup_inverse_sqrt

# Both sides run the same float64 arithmetic in a slightly different order (torch's lerp for
# m, its addcdiv), so they agree to a few ulps per step; 20 steps stay far below 1e-12, while
# a wrong formula (coupled decay, eps inside the sqrt, no bias correction) differs by >= 1e-6.
RTOL_STEP = 1e-12

SHAPES = {"proj.weight": (4, 3), "embed_tokens.weight": (6, 4), "norm.weight": (5,)}


def make_params(rng, dtype=np.float64):
    return {name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()}


def random_grads(rng, params):
    return {name: rng.normal(size=p.shape).astype(p.dtype) for name, p in params.items()}


def torch_optimizer(torch, params, cls, lr, betas, eps, wd, no_decay=("norm.weight",)):
    """torch parameters (float64 copies) in two groups: decayed and not."""
    tp = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    groups = [{"params": [tp[n] for n in tp if n not in no_decay], "weight_decay": wd},
              {"params": [tp[n] for n in tp if n in no_decay], "weight_decay": 0.0}]
    return tp, cls(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def run_against_torch(torch_cls, steps=20, freeze=None):
    """Our AdamW and a torch optimizer on the same random grads and lr schedule; compares the
    parameters and the state after every step."""
    import torch
    rng = np.random.default_rng(0)
    params = make_params(rng)
    schedule = warmup_cosine(3e-2, warmup_steps=5, total_steps=steps, min_lr=1e-3)
    betas, eps, wd = (0.9, 0.95), 1e-8, 0.1
    opt = AdamW(params, lr=schedule, betas=betas, eps=eps, weight_decay=wd, trainable=freeze)
    tp, topt = torch_optimizer(torch, params, torch_cls, schedule(0), betas, eps, wd)
    for step in range(steps):
        grads = random_grads(rng, params)
        trainable = set(opt.trainable_names())
        for n, t in tp.items():        # torch skips a parameter whose grad is None: frozen
            t.grad = torch.from_numpy(grads[n].copy()) if n in trainable else None
        for group in topt.param_groups:
            group["lr"] = schedule(step)
        topt.step()
        assert opt.step(grads) == schedule(step)
        for n, t in tp.items():
            assert_close(f"step {step} {n}", params[n], t.detach().numpy(), RTOL_STEP)
            if n in opt.state:
                assert_close(f"step {step} m {n}", opt.state[n]["exp_avg"], topt.state[t]["exp_avg"].numpy(), RTOL_STEP)
                assert_close(f"step {step} v {n}", opt.state[n]["exp_avg_sq"], topt.state[t]["exp_avg_sq"].numpy(), RTOL_STEP)
                assert opt.state[n]["step"] == int(topt.state[t]["step"])
            else:
                assert t not in topt.state
    return params, opt


def test_adamw_matches_torch_step_by_step():
    torch = pytest.importorskip("torch")
    run_against_torch(torch.optim.AdamW)


def test_coupled_l2_adam_is_not_adamw():
    """Negative control: torch.optim.Adam with weight_decay adds wd p to the gradient
    (coupled L2); the same comparison must fail against it."""
    torch = pytest.importorskip("torch")
    with pytest.raises(AssertionError, match="proj.weight|embed_tokens"):
        run_against_torch(torch.optim.Adam)


def test_freeze_schedule_matches_torch_with_late_parameters():
    """Cross-attention warmup: for K steps only `proj.weight` trains; torch does the same when
    the other grads are None. The late parameters start their own bias correction at step K."""
    torch = pytest.importorskip("torch")
    K = 7
    params, opt = run_against_torch(torch.optim.AdamW, steps=20, freeze=FreezeSchedule({"proj.weight"}, K))
    assert opt.state["proj.weight"]["step"] == 20 and opt.state["norm.weight"]["step"] == 20 - K


def test_frozen_parameters_are_bit_identical_and_their_state_untouched():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    opt = AdamW(params, lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        opt.step(random_grads(rng, params))
    frozen = {n: params[n].copy() for n in ("embed_tokens.weight", "norm.weight")}
    state = {n: {k: np.copy(v) for k, v in opt.state[n].items()} for n in frozen}
    opt.trainable = lambda name: name == "proj.weight"          # a predicate
    before = params["proj.weight"].copy()
    for _ in range(4):
        opt.step(random_grads(rng, params))
    for n in frozen:
        assert np.array_equal(params[n], frozen[n])
        assert all(np.array_equal(opt.state[n][k], state[n][k]) for k in state[n])
    assert opt.state["proj.weight"]["step"] == 7 and not np.array_equal(params["proj.weight"], before)
    # a set of names; a frozen parameter needs no gradient at all
    opt.trainable = {"norm.weight"}
    opt.step({"norm.weight": rng.normal(size=5)})
    assert np.array_equal(params["embed_tokens.weight"], frozen["embed_tokens.weight"])


def test_freeze_schedule_switches_at_k():
    rng = np.random.default_rng(2)
    params = make_params(rng)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, trainable=FreezeSchedule({"norm.weight"}, steps=3))
    start = {n: p.copy() for n, p in params.items()}
    for step in range(3):
        assert opt.trainable_names() == ["norm.weight"]
        opt.step(random_grads(rng, params))
    assert np.array_equal(params["proj.weight"], start["proj.weight"]) and "proj.weight" not in opt.state
    assert not np.array_equal(params["norm.weight"], start["norm.weight"])
    assert opt.trainable_names() == list(SHAPES)
    opt.step(random_grads(rng, params))
    assert not np.array_equal(params["proj.weight"], start["proj.weight"])
    assert opt.state["proj.weight"]["step"] == 1 and opt.state["norm.weight"]["step"] == 4


def test_default_decay_rule_on_zero_gradients():
    """With g = 0, m = v = 0 and the Adam term is exactly 0, so one step multiplies a decayed
    parameter by exactly (1 - lr wd) and leaves a non-decayed one alone."""
    rng = np.random.default_rng(3)
    params = make_params(rng)
    start = {n: p.copy() for n, p in params.items()}
    AdamW(params, lr=0.1, weight_decay=0.2).step({n: np.zeros_like(p) for n, p in params.items()})
    for n in ("proj.weight", "embed_tokens.weight"):
        assert np.array_equal(params[n], start[n] * (1 - 0.1 * 0.2))
    assert np.array_equal(params["norm.weight"], start["norm.weight"])
    # on the real T5Gemma names: norms and the classification bias stay, matrices and embeddings decay
    names = {"model.encoder.layers.0.pre_self_attn_layernorm.weight": (8,), "score.out_proj.bias": (3,),
             "model.decoder.embed_tokens.weight": (11, 8), "model.decoder.layers.0.cross_attn.q_proj.weight": (8, 8)}
    decays = AdamW({n: np.ones(s) for n, s in names.items()}).decays
    assert [decays[n] for n in names] == [False, False, True, True]


def test_bad_inputs_get_clear_errors():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    with pytest.raises(KeyError, match="not parameters: cross_atn"):
        AdamW(params, trainable={"cross_atn"})
    with pytest.raises(KeyError, match="not parameters: nope"):
        AdamW(params, trainable=FreezeSchedule({"nope"}, 3))
    opt = AdamW(params)
    with pytest.raises(KeyError, match="no gradient for trainable parameters: norm.weight"):
        opt.step({n: g for n, g in random_grads(rng, params).items() if n != "norm.weight"})
    with pytest.raises(KeyError, match="unknown parameters: extra"):
        opt.step({**random_grads(rng, params), "extra": np.zeros(2)})
    with pytest.raises(ValueError, match="gradient of proj.weight has shape"):
        opt.step({**random_grads(rng, params), "proj.weight": np.zeros((3, 4))})


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for max_norm in (0.5, 1e3):                                   # clipped, and left alone
        grads = random_grads(rng, make_params(rng))
        tp = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads.values()]
        for t, g in zip(tp, grads.values()):
            t.grad = torch.from_numpy(g.copy())
        want = torch.nn.utils.clip_grad_norm_(tp, max_norm).item()
        original = {n: g.copy() for n, g in grads.items()}
        got = clip_grad_norm(grads, max_norm)
        assert_close(f"norm (max {max_norm})", got, want, RTOL_STEP)
        for (n, g), t in zip(grads.items(), tp):
            assert_close(f"clipped {n}", g, t.grad.numpy(), RTOL_STEP)
        if max_norm > got:
            assert all(np.array_equal(grads[n], original[n]) for n in grads)
    # only the named (trainable) gradients count and change
    grads = random_grads(rng, make_params(rng))
    frozen = grads["embed_tokens.weight"].copy()
    names = ["proj.weight", "norm.weight"]
    want = math.sqrt(sum(np.sum(grads[n] ** 2) for n in names))
    assert_close("norm over names", clip_grad_norm(grads, 0.1, names), want, RTOL_STEP)
    assert np.array_equal(grads["embed_tokens.weight"], frozen)
    assert_close("clipped norm", math.sqrt(sum(np.sum(grads[n] ** 2) for n in names)), 0.1, 1e-5)


def test_schedules_closed_form():
    peak, floor = 1e-3, 1e-4
    lr = warmup_cosine(peak, warmup_steps=10, total_steps=110, min_lr=floor)
    assert lr(0) == pytest.approx(peak / 10)                      # t = 1 of 10
    assert lr(9) == pytest.approx(peak)                           # warmup end
    assert lr(59) == pytest.approx((peak + floor) / 2)            # t = 60: half way down
    assert lr(34) == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr(109) == pytest.approx(floor) and lr(500) == pytest.approx(floor)
    values = [lr(s) for s in range(120)]
    assert all(a <= b for a, b in zip(values[:9], values[1:10]))
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert warmup_cosine(peak, 0, 10)(0) == pytest.approx(peak * (1 + math.cos(math.pi / 10)) / 2)
    inv = warmup_inverse_sqrt(peak, warmup_steps=100)
    assert inv(49) == pytest.approx(peak / 2) and inv(99) == pytest.approx(peak)
    assert inv(399) == pytest.approx(peak / 2) and inv(9999) == pytest.approx(peak / 10)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(peak, 10, 10)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine(peak, 1, 10, min_lr=2 * peak)
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        warmup_inverse_sqrt(peak, 0)


def save_and_load(state):
    """Through the checkpoint's own formats: safetensors bytes for arrays, JSON for the rest."""
    from safetensors.numpy import load, save
    return {"tensors": load(save(state["tensors"])), "meta": json.loads(json.dumps(state["meta"]))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_is_bit_for_bit(dtype):
    N, K = 6, 4
    make_opt = lambda params: AdamW(params, lr=warmup_cosine(1e-2, 3, 2 * N, 1e-3), betas=(0.9, 0.95),
                                    weight_decay=0.1, trainable=FreezeSchedule({"norm.weight"}, K + N))
    rng = np.random.default_rng(6)
    params0 = make_params(rng, dtype)
    grads = [random_grads(rng, params0) for _ in range(2 * N)]
    straight = {n: p.copy() for n, p in params0.items()}
    opt = make_opt(straight)
    for g in grads:
        opt.step(g)
    first = {n: p.copy() for n, p in params0.items()}
    opt1 = make_opt(first)
    for g in grads[:N]:
        opt1.step(g)
    saved, saved_params = save_and_load(opt1.state_dict()), {n: p.copy() for n, p in first.items()}
    resumed = {n: p.copy() for n, p in saved_params.items()}
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved)
    for g in grads[N:]:
        opt2.step(g)
    assert opt2.step_count == 2 * N and set(opt2.state) == set(opt.state)
    for n in params0:
        assert resumed[n].dtype == dtype and np.array_equal(resumed[n], straight[n]), n
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert np.array_equal(opt2.state[n][k], opt.state[n][k]), (n, k)


def test_load_state_dict_rejects_mismatches():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    opt = AdamW(params, weight_decay=0.1)
    opt.step(random_grads(rng, params))
    state = opt.state_dict()
    with pytest.raises(ValueError, match="weight_decay 0.1 was saved"):
        AdamW(params, weight_decay=0.0).load_state_dict(state)
    with pytest.raises(KeyError, match="unknown parameters: norm.weight"):
        AdamW({n: p for n, p in params.items() if n != "norm.weight"}, weight_decay=0.1).load_state_dict(state)
    bad = {"tensors": {**state["tensors"], "exp_avg/proj.weight": np.zeros((3, 4))}, "meta": state["meta"]}
    with pytest.raises(ValueError, match=r"exp_avg/proj.weight is float64\(3, 4\)"):
        AdamW(params, weight_decay=0.1).load_state_dict(bad)
    missing = {"tensors": {k: v for k, v in state["tensors"].items() if k != "exp_avg_sq/norm.weight"},
               "meta": state["meta"]}
    with pytest.raises(KeyError, match="missing exp_avg_sq/norm.weight"):
        AdamW(params, weight_decay=0.1).load_state_dict(missing)
    assert optim.AdamW(params, weight_decay=0.1).step_count == 0


def test_cross_attention_warmup_on_a_tiny_t5gemma():
    """The whole recipe on the unbalanced pair: train only cross-attention for K steps (every
    other tensor bit-identical), then everything; clip over the trainable grads; loss falls."""
    from cases import T5GEMMA_CASES, random_inputs

    from minencdec.model.t5gemma import T5GemmaModel, cross_attention_names

    config, K = T5GEMMA_CASES["unbalanced"], 4
    model = T5GemmaModel.random(config, seed=0, dtype="float64")
    x = random_inputs(config, seed=1)
    opt = AdamW(model.params, lr=warmup_cosine(2e-2, 2, 20), weight_decay=0.01,
                trainable=FreezeSchedule(cross_attention_names(config), K))
    start = {n: p.copy() for n, p in model.params.items()}
    losses = []
    for step in range(20):
        loss, grads = model.loss_and_grads(x["input_ids"], x["labels"], x["attention_mask"])
        losses.append(loss)
        assert math.isfinite(clip_grad_norm(grads, 1.0, opt.trainable_names()))
        opt.step(grads)
        if step == K - 1:
            changed = {n for n in model.params if not np.array_equal(model.params[n], start[n])}
            assert changed == set(cross_attention_names(config))
    assert "model.encoder.embed_tokens.weight" in opt.state and losses[-1] < losses[0] - 0.5, losses


# ---------------------------------------------------------------------- the fused update (backend="numba")


def run_both_backends(dtype, steps=20):
    """The NumPy loop and the fused update side by side: lr schedule, decay rule, a freeze
    schedule (late parameters start their own bias correction), 0-d gradients of every scale."""
    rng = np.random.default_rng(11)
    params = make_params(rng, dtype)
    fused = {n: p.copy() for n, p in params.items()}
    kw = dict(lr=warmup_cosine(3e-2, 5, steps, 1e-3), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
              trainable=FreezeSchedule({"proj.weight"}, 4))
    ref, fast = AdamW(params, **kw), AdamW(fused, **kw, backend="numba")
    for _ in range(steps):
        grads = {n: (g * 10.0 ** rng.uniform(-6, 3)).astype(dtype) for n, g in random_grads(rng, params).items()}
        ref.step(grads)
        fast.step(grads)
    return (params, ref), (fused, fast)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_update_gives_the_numpy_loops_bits(dtype):
    (params, ref), (fused, fast) = run_both_backends(dtype)
    for n in params:
        assert np.array_equal(fused[n], params[n]), n
        for k in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(fast.state[n][k], ref.state[n][k]), (n, k)


def test_fused_update_matches_torch_step_by_step():
    torch = pytest.importorskip("torch")
    import functools
    original = optim.AdamW.__init__
    try:
        optim.AdamW.__init__ = functools.partialmethod(original, backend="numba")
        run_against_torch(torch.optim.AdamW)
    finally:
        optim.AdamW.__init__ = original


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        AdamW(make_params(np.random.default_rng(0)), backend="cuda")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_steps_after_the_first_build_no_new_state(backend, monkeypatch):
    """m and v are made once per parameter. (`state.setdefault(name, {... np.zeros_like(p) ...})`
    built two zero tensors per parameter at every step and threw them away: for a 262,144 x
    640 embedding 1.3 GB allocated and filled per step.)"""
    rng = np.random.default_rng(1)
    params = make_params(rng)
    opt = AdamW(params, weight_decay=0.1, backend=backend)
    opt.step(random_grads(rng, params))
    made = []
    real = np.zeros_like
    monkeypatch.setattr(optim.np, "zeros_like", lambda a, *args, **kw: made.append(a.shape) or real(a, *args, **kw))
    opt.step(random_grads(rng, params))
    assert made == []


def test_fused_update_allocates_nothing_the_size_of_a_tensor():
    import tracemalloc
    rng = np.random.default_rng(2)
    params = {"big.weight": rng.standard_normal((1024, 1024)).astype(np.float32)}
    opt = AdamW(params, weight_decay=0.1, backend="numba")
    grads = {"big.weight": rng.standard_normal((1024, 1024)).astype(np.float32)}
    opt.step(grads)
    tracemalloc.start()
    opt.step(grads)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < params["big.weight"].nbytes / 8, peak


def test_global_norm_is_exact_without_a_float64_copy():
    """float64 accumulation (oracle: math.fsum of the float64 squares), a block at a time: the
    tracemalloc peak stays far below a float64 copy of the tensor (32 MB here)."""
    import tracemalloc
    rng = np.random.default_rng(3)
    g = {"a": (rng.standard_normal(4_000_000) * 1e3).astype(np.float32), "b": rng.standard_normal((3, 5))}
    want = math.sqrt(math.fsum(float(x) ** 2 for x in np.concatenate([g["a"].astype(np.float64),
                                                                        g["b"].ravel()])))
    tracemalloc.start()
    got = optim.global_norm(g)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == pytest.approx(want, rel=1e-13)
    assert peak < g["a"].nbytes, peak
