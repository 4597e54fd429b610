"""The math of the RL stages, pinned against hand computations and float64 references:
GRPO's group advantages and PPO/REINFORCE loss, MOPD's advantage and mismatch weights, and the
Bradley-Terry loss of the reward model. Fast: no model, only small tensors."""

import math

import pytest
import torch

from grpo import policy_loss
from rl import group_advantages, k3
from mopd import mismatch_weights, mopd_advantages, mopd_loss
from rlhf import bradley_terry_loss

D = torch.float64


# ---------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_hand_computed():
    # group 1: [1, 0, 0, 1] -> mean 0.5, population std 0.5 -> +-1
    # group 2: [0.2, 0.4, 0.9, 0.5] -> mean 0.5, population var = (0.09+0.01+0.16+0)/4 = 0.065
    r = torch.tensor([1, 0, 0, 1, 0.2, 0.4, 0.9, 0.5], dtype=D)
    a = group_advantages(r, 4, eps=0.0)
    s = math.sqrt(0.065)
    expected = torch.tensor([1, -1, -1, 1, -0.3 / s, -0.1 / s, 0.4 / s, 0.0], dtype=D)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-12)
    # with eps the denominator is std + eps
    a_eps = group_advantages(r, 4, eps=0.1)
    torch.testing.assert_close(a_eps[:4], torch.tensor([1, -1, -1, 1], dtype=D) * 0.5 / 0.6)
    # without std normalization: just centered
    a_c = group_advantages(r, 4, normalize_std=False)
    torch.testing.assert_close(a_c, torch.tensor([.5, -.5, -.5, .5, -.3, -.1, .4, 0], dtype=D))


def test_group_advantages_population_std_not_unbiased():
    # G = 2, rewards [0, 1]: population std 0.5 -> +-1; the unbiased std (0.7071) would give +-0.7071
    a = group_advantages(torch.tensor([0.0, 1.0], dtype=D), 2, eps=0.0)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0], dtype=D))
    # and on random groups: mean 0, mean square exactly 1 per group (population normalization)
    r = torch.rand(5 * 7, dtype=D)
    a = group_advantages(r, 7, eps=0.0).view(5, 7)
    torch.testing.assert_close(a.mean(1), torch.zeros(5, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close((a ** 2).mean(1), torch.ones(5, dtype=D))


def test_group_advantages_zero_spread_and_groups_of_one():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.5], dtype=D)
    a = group_advantages(r, 3)
    assert (a[:3] == 0).all()            # exactly zero, not 0/eps noise
    assert a[3] > 0 and a[4] < 0
    a1 = group_advantages(torch.rand(6, dtype=D), 1)
    assert (a1 == 0).all() and not a1.isnan().any()
    with pytest.raises(ValueError):
        group_advantages(torch.rand(7), 3)


# ---------------------------------------------------------------------------------------------
# policy_loss


def reference_policy_loss(lp, old, adv, mask, lo, hi):
    """Python loops over tokens, straight from the definition."""
    total, n = 0.0, 0
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if mask[b][t]:
                rho = math.exp(lp[b][t] - old[b][t])
                total += min(rho * adv[b], min(max(rho, 1 - lo), 1 + hi) * adv[b])
                n += 1
    return -total / n


def test_policy_loss_matches_definition():
    torch.manual_seed(0)
    B, T = 5, 9
    lp = -torch.rand(B, T, dtype=D) * 3
    old = lp + 0.4 * torch.randn(B, T, dtype=D)      # ratios well outside [0.8, 1.28] too
    adv = torch.randn(B, dtype=D)
    mask = (torch.rand(B, T) < 0.7).to(D)
    loss, clipped = policy_loss(lp, old, adv, mask, 0.2, 0.28)
    ref = reference_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28)
    assert abs(loss.item() - ref) < 1e-12
    assert 0 < clipped.sum() < mask.sum() and (clipped <= mask).all()
    # num_tokens = global count: the loss is the local sum divided by it
    loss_g, _ = policy_loss(lp, old, adv, mask, 0.2, 0.28, num_tokens=mask.sum() * 3)
    torch.testing.assert_close(loss_g, loss / 3)


def test_policy_loss_is_token_level_mean_not_mean_of_sequence_means():
    # two responses, lengths 1 and 3, advantages 1 and 0, ratio 1: token mean = -1/4;
    # the mean of per-sequence means would be -(1 + 0)/2 = -1/2
    lp = torch.zeros(2, 3, dtype=D)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=D)
    loss, _ = policy_loss(lp, lp, torch.tensor([1.0, 0.0], dtype=D), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-0.25, abs=1e-15)


def test_policy_loss_on_policy_gradient_is_reinforce():
    torch.manual_seed(1)
    B, T, V = 4, 6, 11
    logits = torch.randn(B, T, V, dtype=D, requires_grad=True)
    tokens = torch.randint(V, (B, T))
    mask = (torch.rand(B, T) < 0.8).to(D)
    adv = torch.randn(B, dtype=D)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, clipped = policy_loss(lp, lp.detach(), adv, mask, 0.2, 0.28)
    (g_ppo,) = torch.autograd.grad(loss, logits)
    assert clipped.sum().item() == 0
    # REINFORCE: -sum_i A_i sum_t grad log pi / N_tokens
    lp2 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    reinforce = -(adv[:, None] * lp2 * mask).sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(reinforce, logits)
    torch.testing.assert_close(g_ppo, g_ref, rtol=1e-12, atol=1e-14)
    # and that gradient is not zero (the test would pass vacuously otherwise)
    assert g_ref.abs().max() > 1e-3


@pytest.mark.parametrize("adv", [2.0, -2.0])
def test_policy_loss_clipping_both_sides(adv):
    lo, hi = 0.2, 0.28
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0], dtype=D)
    old = torch.zeros(1, 7, dtype=D)
    lp = ratios.log()[None].clone().requires_grad_(True)
    mask = torch.ones(1, 7, dtype=D)
    # per token: sum over a single token each, so test them one at a time
    for t, rho in enumerate(ratios.tolist()):
        m = torch.zeros(1, 7, dtype=D)
        m[0, t] = 1
        loss, clipped = policy_loss(lp, old, torch.tensor([adv], dtype=D), m, lo, hi)
        (g,) = torch.autograd.grad(loss, lp)
        # PPO: the clip binds (flat objective, zero gradient) when A > 0 and rho > 1 + hi,
        # or A < 0 and rho < 1 - lo; otherwise the objective is rho * A
        binds = (adv > 0 and rho > 1 + hi) or (adv < 0 and rho < 1 - lo)
        expected_obj = (min(max(rho, 1 - lo), 1 + hi) if binds else rho) * adv
        assert loss.item() == pytest.approx(-expected_obj, abs=1e-12)
        assert clipped.sum().item() == float(binds)
        expected_grad = 0.0 if binds else -rho * adv  # d(rho A)/d log pi = rho A
        assert g[0, t].item() == pytest.approx(expected_grad, abs=1e-12)
    _, clipped = policy_loss(lp, old, torch.tensor([adv], dtype=D), mask, lo, hi)
    assert clipped.sum().item() == 2


def test_k3_is_nonnegative_and_unbiased_for_kl():
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(5, dtype=D), 0)
    q = torch.softmax(torch.randn(5, dtype=D), 0)
    # E_{y ~ p}[k3(log p(y), log q(y))] = KL(p || q) exactly (sum over the vocab)
    est = (p * k3(p.log(), q.log())).sum()
    torch.testing.assert_close(est, (p * (p.log() - q.log())).sum())
    assert (k3(p.log(), q.log()) >= 0).all()


def test_k3_gradient_is_that_of_the_forward_kl():
    """As a loss term differentiated through log pi (samples held fixed), E_pi[grad k3] is the
    gradient of KL(ref || pi), not of KL(pi || ref): exactly, summed over a small vocabulary."""
    torch.manual_seed(7)
    logits = torch.randn(6, dtype=D, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(6, dtype=D), 0)
    log_pi = torch.log_softmax(logits, 0)
    expected_grad_k3 = (log_pi.exp().detach() * k3(log_pi, log_ref)).sum()   # E_pi, weights held fixed
    (g,) = torch.autograd.grad(expected_grad_k3, logits)
    forward_kl = (log_ref.exp() * (log_ref - torch.log_softmax(logits, 0))).sum()
    (g_forward,) = torch.autograd.grad(forward_kl, logits)
    reverse_kl = (torch.softmax(logits, 0) * (torch.log_softmax(logits, 0) - log_ref)).sum()
    (g_reverse,) = torch.autograd.grad(reverse_kl, logits)
    torch.testing.assert_close(g, g_forward, rtol=1e-12, atol=1e-14)
    assert (g - g_reverse).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# MOPD


def test_mopd_advantages_exact_and_no_grad():
    torch.manual_seed(3)
    teacher = -torch.rand(3, 5, dtype=D)
    student = (-torch.rand(3, 5, dtype=D)).requires_grad_(True)
    mask = (torch.rand(3, 5) < 0.6).to(D)
    a = mopd_advantages(teacher, student, mask)
    assert not a.requires_grad
    torch.testing.assert_close(a, (teacher - student.detach()) * mask, rtol=0, atol=0)
    assert (a[mask == 0] == 0).all()
    assert (mopd_advantages(student.detach(), student, mask) == 0).all()


def test_mismatch_weights_drop_outside_keep_inside():
    ratios = torch.tensor([0.3, 0.49, 0.5, 0.9, 1.0, 1.7, 2.0, 2.01, 5.0], dtype=D)
    inf_lp = -torch.rand(9, dtype=D)
    train_lp = (inf_lp + ratios.log()).requires_grad_(True)
    w = mismatch_weights(train_lp, inf_lp)
    assert not w.requires_grad
    expected = torch.where((ratios >= 0.5) & (ratios <= 2.0), ratios, 0.0)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)
    assert (w[[0, 1, 7, 8]] == 0).all()           # dropped, not clipped to 0.5 / 2


def test_mopd_expected_advantage_is_minus_reverse_kl():
    # under the student's own distribution, E_y[log pt(y) - log ps(y)] = -KL(ps || pt), summed
    # exactly over a small vocabulary (several states at once)
    torch.manual_seed(4)
    S, V = 6, 7
    log_ps = torch.log_softmax(torch.randn(S, V, dtype=D), -1)
    log_pt = torch.log_softmax(torch.randn(S, V, dtype=D), -1)
    a_S_V = mopd_advantages(log_pt, log_ps, torch.ones(S, V, dtype=D))
    expected_adv = (log_ps.exp() * a_S_V).sum(-1)
    reverse_kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    torch.testing.assert_close(expected_adv, -reverse_kl, rtol=1e-12, atol=1e-14)
    assert (reverse_kl > 0).all()


def test_mopd_loss_gradient():
    # L = -(1/N) sum_y (1/|V(y)|) sum_t w a log pi: the gradient w.r.t. log pi is -w a / (N |V(y)|),
    # with w and a constants: two responses of 3 and 2 tokens, each weighing the same
    torch.manual_seed(5)
    train = (-torch.rand(2, 4, dtype=D)).requires_grad_(True)
    inf = train.detach() + 0.5 * torch.randn(2, 4, dtype=D)
    teacher = -torch.rand(2, 4, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=D)
    loss, a, w = mopd_loss(train, teacher, inf, mask, 0.5, 2.0)
    (g,) = torch.autograd.grad(loss, train)
    torch.testing.assert_close(g, -w * a / torch.tensor([[2 * 3.0], [2 * 2.0]], dtype=D))
    loss_g, _, _ = mopd_loss(train, teacher, inf, mask, 0.5, 2.0, num_responses=6)   # a global batch of 6
    torch.testing.assert_close(loss_g, loss / 3)
    r = (train.detach() - inf).exp()
    torch.testing.assert_close(w, torch.where((r >= 0.5) & (r <= 2), r, 0.0) * mask)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry


def test_bradley_terry_loss_and_gradient():
    torch.manual_seed(6)
    rc = torch.randn(8, dtype=D, requires_grad=True)
    rr = torch.randn(8, dtype=D, requires_grad=True)
    loss = bradley_terry_loss(rc, rr)
    expected = torch.tensor([-math.log(1 / (1 + math.exp(-(c - r))))
                             for c, r in zip(rc.tolist(), rr.tolist())], dtype=D).mean()
    torch.testing.assert_close(loss, expected)
    gc, gr = torch.autograd.grad(loss, (rc, rr))
    # d/dr_c [-log sigma(r_c - r_r)] = -sigma(r_r - r_c), averaged over the 8 pairs
    torch.testing.assert_close(gc, -torch.sigmoid(rr - rc).detach() / 8)
    torch.testing.assert_close(gr, torch.sigmoid(rr - rc).detach() / 8)
