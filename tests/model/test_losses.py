"""Distillation loss: finite differences, torch, identities, a negative control, bad input.

(Plain cross-entropy is tested in test_blocks.py.)
"""

import numpy as np
import pytest
from helpers import RTOL_F32, RTOL_F64, assert_close, gradcheck

from minencdec.model.losses import (cross_entropy_backward, cross_entropy_forward, distillation_backward,
                                    distillation_forward)

rng = np.random.default_rng(0)
SETTINGS = [(1.0, 1.0), (2.0, 0.5), (0.5, 0.3), (4.0, 1.0), (1.5, 0.0)]     # (temperature, alpha)


def make_batch(shape=(2, 5), V=7, ignored=((0, 2), (1, 4))):
    student = rng.normal(0, 3, size=(*shape, V))
    teacher = rng.normal(0, 3, size=(*shape, V))
    targets = rng.integers(0, V, size=shape)
    for i in ignored:
        targets[i] = -100
    return student, teacher, targets


def torch_distillation(student, teacher, targets, T, alpha):
    """The same loss written with torch's soft-target cross-entropy, and its autograd gradient."""
    import torch
    import torch.nn.functional as F
    s = torch.tensor(student, requires_grad=True)
    V = student.shape[-1]
    valid = torch.from_numpy(targets.reshape(-1) != -100)
    s2, t2 = s.reshape(-1, V), torch.from_numpy(teacher).reshape(-1, V)
    soft = F.cross_entropy(s2[valid] / T, F.softmax(t2[valid] / T, dim=-1))      # probability targets
    hard = F.cross_entropy(s2, torch.from_numpy(targets.reshape(-1)), ignore_index=-100)
    loss = alpha * T**2 * soft + (1 - alpha) * hard
    loss.backward()
    return loss.item(), s.grad.numpy()


@pytest.mark.parametrize("T,alpha", SETTINGS)
def test_distillation_gradient_by_finite_differences(T, alpha):
    student, teacher, targets = make_batch()
    loss, cache = distillation_forward(student, teacher, targets, T, alpha)
    g = distillation_backward(cache, dloss=1.7)
    gradcheck(f"student (T={T}, alpha={alpha})",
              lambda: 1.7 * distillation_forward(student, teacher, targets, T, alpha)[0], student, g, rng)
    assert np.all(g[0, 2] == 0) and np.all(g[1, 4] == 0)       # ignored tokens get no gradient


@pytest.mark.parametrize("T,alpha", SETTINGS)
def test_distillation_matches_torch(T, alpha):
    pytest.importorskip("torch")
    student, teacher, targets = make_batch(shape=(2, 3, 4), V=11, ignored=((0, 1, 2), (1, 2, 0)))
    loss, cache = distillation_forward(student, teacher, targets, T, alpha)
    want_loss, want_grad = torch_distillation(student, teacher, targets, T, alpha)
    assert_close("loss", loss, want_loss, RTOL_F64)
    assert_close("dstudent", distillation_backward(cache), want_grad, RTOL_F64)


def test_soft_term_is_kl_plus_teacher_entropy_by_torch_kl_div():
    """A second torch oracle: soft CE = KL(p || q) + H(p), with F.kl_div for the KL."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    T = 2.5
    student, teacher, _ = make_batch(shape=(6,), V=9, ignored=())
    logq = F.log_softmax(torch.from_numpy(student) / T, -1)
    logp = F.log_softmax(torch.from_numpy(teacher) / T, -1)
    kl = F.kl_div(logq, logp, reduction="batchmean", log_target=True)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    loss, _ = distillation_forward(student, teacher, np.zeros(6, int), T, alpha=1.0)
    assert_close("T^2 (KL + H)", loss, T**2 * (kl + entropy).item(), RTOL_F64)


def test_wrong_temperature_power_fails_the_torch_comparison():
    """Negative control: a loss scaled by T instead of T^2 must fail the same check."""
    pytest.importorskip("torch")
    T = 2.0
    student, teacher, targets = make_batch()
    loss, cache = distillation_forward(student, teacher, targets, T, alpha=1.0)
    want_loss, want_grad = torch_distillation(student, teacher, targets, T, 1.0)
    with pytest.raises(AssertionError):
        assert_close("T^1 loss", loss / T, want_loss, RTOL_F64)
    with pytest.raises(AssertionError):
        assert_close("T^1 gradient", distillation_backward(cache) / T, want_grad, RTOL_F64)


def test_alpha_zero_is_plain_cross_entropy():
    student, teacher, targets = make_batch()
    loss, cache = distillation_forward(student, teacher, targets, temperature=3.0, alpha=0.0)
    ce, ce_cache = cross_entropy_forward(student, targets)
    assert_close("loss", loss, ce, RTOL_F64)
    assert_close("dstudent", distillation_backward(cache), cross_entropy_backward(ce_cache), RTOL_F64)


@pytest.mark.parametrize("T", [0.7, 1.0, 3.0])
def test_teacher_equal_to_student_gives_teacher_entropy(T):
    """With q = p the soft term is the entropy H(p) = logsumexp(z/T) - sum_v p_v z_v / T, and
    its gradient (q - p) vanishes."""
    z, _, targets = make_batch()
    valid = targets != -100
    u = z / T
    p = np.exp(u) / np.exp(u).sum(-1, keepdims=True)
    entropy = np.log(np.exp(u).sum(-1)) - (p * u).sum(-1)                  # (B, N)
    loss, cache = distillation_forward(z, z.copy(), targets, T, alpha=1.0)
    assert_close("T^2 mean entropy", loss, T**2 * entropy[valid].mean(), RTOL_F64)
    assert np.max(np.abs(distillation_backward(cache))) < 1e-15


def test_leading_shapes_and_float32():
    student, teacher, targets = make_batch(shape=(9,), V=5, ignored=((3,),))
    loss2, c2 = distillation_forward(student, teacher, targets, 2.0, 0.5)
    loss4, c4 = distillation_forward(student.reshape(1, 3, 3, 5), teacher.reshape(1, 3, 3, 5),
                                     targets.reshape(1, 3, 3), 2.0, 0.5)
    assert_close("loss, any leading shape", loss4, loss2, RTOL_F64)
    assert_close("grad, any leading shape", distillation_backward(c4).reshape(9, 5), distillation_backward(c2), RTOL_F64)
    loss32, c32 = distillation_forward(student.astype(np.float32), teacher.astype(np.float32), targets, 2.0, 0.5)
    g32 = distillation_backward(c32)
    assert g32.dtype == np.float32
    assert_close("float32 loss", loss32, loss2, RTOL_F32)
    assert_close("float32 grad", g32, distillation_backward(c2), RTOL_F32)


def test_bad_inputs_get_clear_errors():
    student, teacher, targets = make_batch()
    with pytest.raises(ValueError, match=r"student logits \(2, 5, 7\) and teacher logits \(2, 5, 8\)"):
        distillation_forward(student, np.zeros((2, 5, 8)), targets)
    with pytest.raises(ValueError, match=r"targets \(2, 4\)"):
        distillation_forward(student, teacher, targets[:, :4])
    for T in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            distillation_forward(student, teacher, targets, temperature=T)
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha .* must be in \[0, 1\]"):
            distillation_forward(student, teacher, targets, alpha=alpha)
    with pytest.raises(ValueError, match="every target is -100"):
        distillation_forward(student, teacher, np.full_like(targets, -100))
