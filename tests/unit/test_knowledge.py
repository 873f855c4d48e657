"""Knowledge constraints against closed forms and exact limits (../shared/notes/knowledge_constraints.md)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.knowledge.constraints import ClassConsistency, LinearConstraint, RuleConfidences, Symmetry
from trainer.knowledge.logic import soft_and, soft_implies, soft_mean_and, soft_not, soft_or
from trainer.knowledge.teacher import (categorical_teacher, distill_loss, ess, importance_teacher, irl_loss,
                                       pi_schedule, reverse_kl_loss, rule_score, weighted_nll_term)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- categorical teacher -------------------------------------------------------------------------


def test_categorical_teacher_equals_p_exp_lambda_f_over_z():
    logits, f = torch.randn(6, 5, generator=gen(1)), torch.randn(6, 5, generator=gen(2))
    lam = 1.7
    p = F.softmax(logits.double(), -1)
    unnorm = p * torch.exp(lam * f.double())
    expected = unnorm / unnorm.sum(-1, keepdim=True)
    t = categorical_teacher(logits, lam * f)
    assert torch.allclose(t.q.double(), expected, atol=1e-6, rtol=0)
    assert not t.fallback.any()


def test_lambda_zero_teacher_is_p_bit_for_bit_and_pi_zero_is_plain_cross_entropy():
    logits, y = torch.randn(8, 4, generator=gen(3)), torch.randint(4, (8,), generator=gen(4))
    f = torch.randn(8, 4, generator=gen(5))
    t = categorical_teacher(logits, 0.0 * f)
    assert torch.equal(t.log_q, F.log_softmax(logits, -1))
    plain = F.cross_entropy(logits, y)
    assert torch.equal(distill_loss(logits, y, categorical_teacher(logits, 3.0 * f).log_q, 0.0), plain)
    # lambda = 0: the imitation term vanishes exactly (q = p), so only the (1 - pi)-weighted CE remains.
    assert torch.equal(distill_loss(logits, y, t.log_q, 0.4), 0.6 * plain + 0.4 * torch.zeros(()))


def test_distill_loss_by_hand_with_unlabelled_rows():
    logits, y = torch.randn(4, 3, generator=gen(6)), torch.tensor([0, 2, 1, 1])
    log_q = F.log_softmax(torch.randn(4, 3, generator=gen(7)), -1)
    labelled = torch.tensor([True, True, False, False])
    lp = F.log_softmax(logits, -1)
    ce = -(lp[0, 0] + lp[1, 2]) / 2
    kl = (log_q.exp() * (log_q - lp)).sum() / 4
    got = distill_loss(logits, y, log_q, 0.3, labelled)
    assert abs(float(got) - float(0.7 * ce + 0.3 * kl)) < 1e-6


def test_hard_rules_zero_mass_on_violations_and_fully_masked_row_falls_back_to_p():
    logits = torch.randn(3, 4, generator=gen(8))
    allowed = torch.tensor([[True, False, True, False], [False] * 4, [False, False, False, True]])
    t = categorical_teacher(logits, torch.randn(3, 4, generator=gen(9)), allowed)
    assert torch.all(t.q[~allowed & ~t.fallback[:, None]] == 0)
    assert t.fallback.tolist() == [False, True, False] and int(t.fallback.sum()) == 1
    assert torch.equal(t.log_q[1], F.log_softmax(logits, -1)[1])  # exactly p, not p times the score
    assert abs(float(t.q[2, 3]) - 1.0) < 1e-7
    assert torch.allclose(t.q.sum(-1), torch.ones(3))


def test_rule_score_and_soft_logic_truth_tables():
    a, b = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.3]), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.9])
    assert soft_and(a, b).tolist() == pytest.approx([0, 0, 0, 1, 0.2])
    assert soft_or(a, b).tolist() == pytest.approx([0, 1, 1, 1, 1])
    assert soft_not(a).tolist() == pytest.approx([1, 1, 0, 0, 0.7])
    assert soft_implies(a, b).tolist() == pytest.approx([1, 1, 0, 1, 1])
    assert soft_mean_and(a, b).tolist() == pytest.approx([0, 0.5, 0.5, 1, 0.6])
    rules = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])  # (B=1, K=2, L=2)
    score = rule_score(rules, torch.tensor([1.0, 2.0]), C=6.0)
    assert score[0].tolist() == pytest.approx([-6 * (0 + 2 * 0.5), -6 * (1 + 0)])


def test_pi_schedule_is_capped_one_minus_decay_power_epochs():
    assert pi_schedule(0, 100) == 0.0
    assert pi_schedule(250, 100, pi0=0.9, decay=0.95) == pytest.approx(1 - 0.95 ** 2.5)
    assert pi_schedule(10 ** 6, 100, pi0=0.9) == 0.9


def test_learned_rule_confidence_gradient_is_c_times_rule_minus_teacher_expectation():
    logits, y = torch.randn(5, 3, generator=gen(10)), torch.tensor([0, 1, 2, 1, 0])
    rules = torch.rand(5, 3, 2, generator=gen(11))
    conf = RuleConfidences(2, init=0.7, C=6.0)
    conf.loss(logits, rules, y).backward()
    log_q = categorical_teacher(logits, conf.score(rules).detach()).log_q
    r_y = rules[torch.arange(5), y]  # (B, L)
    e_q = (log_q.exp()[..., None] * rules).sum(1)
    expected = -6.0 * (r_y - e_q).mean(0)  # the loss is -mean log q
    assert torch.allclose(conf.lam.grad, expected, atol=1e-5)


# ---- importance-weighted teacher: Gaussian oracles ------------------------------------------------

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)


def gaussian(n, seed=0):
    z = torch.randn(n, 2, generator=gen(seed), dtype=torch.float64)
    return MU + z @ torch.linalg.cholesky(SIGMA).T


def test_linear_constraint_teacher_mean_log_z_and_ess():
    a = torch.tensor([0.8, -0.6], dtype=torch.float64)
    lam = math.sqrt(0.75 / float(a @ SIGMA @ a))  # lambda^2 a^T Sigma a = 0.75, the notes' case
    x = gaussian(400_000)
    t = importance_teacher(lam * x @ a)
    mean = (t.w.double()[:, None] * x).sum(0)
    assert torch.allclose(mean, MU + lam * SIGMA @ a, atol=0.02)
    log_z = lam * float(a @ MU) + 0.5 * lam ** 2 * float(a @ SIGMA @ a)
    assert abs(float(t.log_z) - log_z) < 0.01
    assert abs(float(t.ess_frac) - math.exp(-0.75)) < 0.01  # 0.4724


def test_quadratic_constraint_teacher_moments():
    m, B, lam = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 2.0]],
                                                                           dtype=torch.float64), 0.7
    x = gaussian(400_000, seed=1)
    d = x - m
    f = -0.5 * ((d @ B) * d).sum(1)
    w = importance_teacher(lam * f).w.double()
    cov_q = torch.linalg.inv(torch.linalg.inv(SIGMA) + lam * B)
    mu_q = cov_q @ (torch.linalg.inv(SIGMA) @ MU + lam * B @ m)
    mean = (w[:, None] * x).sum(0)
    cov = (w[:, None, None] * torch.einsum("ni,nj->nij", x - mean, x - mean)).sum(0)
    assert torch.allclose(mean, mu_q, atol=0.02)
    assert torch.allclose(cov, cov_q, atol=0.02)


def test_ess_formula_on_hand_weights():
    s = torch.log(torch.tensor([1.0, 1.0, 2.0]))
    assert float(ess(s)) == pytest.approx(16 / 6)  # (sum w)^2 / sum w^2
    assert float(ess(torch.zeros(7))) == pytest.approx(7.0)


def test_grouped_weights_normalise_per_condition():
    s, g = torch.tensor([0.0, 1.0, 2.0, 0.5]), torch.tensor([0, 1, 0, 1])
    w = importance_teacher(s, g).w
    assert torch.allclose(w[[0, 2]], F.softmax(s[[0, 2]], 0)) and torch.allclose(w[[1, 3]], F.softmax(s[[1, 3]], 0))


def test_irl_update_converges_to_the_gaussian_fixed_point():
    mu_d, lam = torch.tensor([1.0, -0.5], dtype=torch.float64), 2.0
    x_model = gaussian(20_000, seed=2).float()
    x_data = (gaussian(20_000, seed=3) - MU + mu_d).float()
    f = LinearConstraint(2)
    opt = torch.optim.Adam(f.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        irl_loss(f(x_data), f(x_model), lam).backward()
        opt.step()
    expected = torch.linalg.inv(SIGMA) @ (mu_d - MU) / lam
    assert torch.allclose(f.phi.detach().double(), expected, atol=0.05), (f.phi, expected)


def test_irl_loss_value_is_data_term_plus_log_mean_exp():
    fd, fm, lam = torch.randn(5, generator=gen(12)), torch.randn(7, generator=gen(13)), 1.3
    want = -lam * fd.mean() + torch.logsumexp(lam * fm, 0) - math.log(7)
    assert float(irl_loss(fd, fm, lam)) == pytest.approx(float(want), abs=1e-6)


def test_conditional_irl_loss_builds_log_z_per_class_weighted_by_the_data_shares():
    """With labels, log Z = sum_c pi_c log mean_{i in c} exp(lambda f_i) (pi_c: the data's class shares),
    and the gradient wrt f_i is lambda pi_c w_i within its class; pooling the classes would differ."""
    lam = 0.7
    fd, fm = torch.randn(6, generator=gen(20)), torch.randn(7, generator=gen(21)).requires_grad_(True)
    y_data, y_model = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 1, 1, 0, 1, 1, 1])
    pi = {0: 4 / 6, 1: 2 / 6}
    log_z = sum(pi[c] * (torch.logsumexp(lam * fm[y_model == c], 0) - math.log(int((y_model == c).sum())))
                for c in (0, 1))
    loss = irl_loss(fd, fm, lam, y_data, y_model)
    assert float(loss) == pytest.approx(float(-lam * fd.mean() + log_z), abs=1e-6)
    loss.backward()
    want = torch.zeros(7)
    for c in (0, 1):
        idx = y_model == c
        want[idx] = lam * pi[c] * torch.softmax(lam * fm.detach()[idx], 0)
    assert torch.allclose(fm.grad, want, atol=1e-6)
    pooled = irl_loss(fd, fm.detach(), lam)
    assert abs(float(pooled) - float(loss)) > 1e-3


def test_conditional_irl_fixed_point_keeps_the_class_mix():
    """Per-class linear constraint f(x, c) = phi_c x on 1-D Gaussians: p(x | c) = N(0, 1), data
    N(mu_c, 1) with unequal class shares. The max-ent fixed point is phi_c = mu_c (lambda 1) for each
    class, whatever the model's class mix (uniform here)."""
    torch.manual_seed(0)
    mu, shares = torch.tensor([1.0, -0.5]), torch.tensor([0.85, 0.15])  # pooled classes: about (1.29, -0.32)
    phi = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    g = gen(22)
    for _ in range(400):
        y_d = torch.multinomial(shares, 512, replacement=True, generator=g)
        x_d = mu[y_d] + torch.randn(512, generator=g)
        y_m = torch.randint(2, (512,), generator=g)
        x_m = torch.randn(512, generator=g)
        opt.zero_grad()
        irl_loss(phi[y_d] * x_d, phi[y_m] * x_m, 1.0, y_d, y_m).backward()
        opt.step()
    assert torch.allclose(phi.detach(), mu, atol=0.15), phi


def test_reverse_kl_generator_gradient_is_minus_lambda_a_for_linear_f():
    a, lam = torch.tensor([0.3, -1.2, 2.0]), 0.8
    m, s = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    x = m + s * torch.randn(64, 3, generator=gen(14))
    reverse_kl_loss(x @ a, lam).backward()
    assert torch.allclose(m.grad, -lam * a, atol=1e-6)
    assert float(reverse_kl_loss(x.detach() @ a, 0.0)) == 0.0


def test_weighted_nll_term_is_zero_at_lambda_zero_and_has_the_importance_weighted_gradient():
    theta = torch.randn(6, generator=gen(15), requires_grad=True)
    nll = theta ** 2
    term, t = weighted_nll_term(nll, torch.zeros(6), alpha=0.5)
    assert float(term) == 0.0 and float(t.ess_frac) == pytest.approx(1.0)
    s = torch.randn(6, generator=gen(16))
    term, _ = weighted_nll_term(nll, s, alpha=0.5)
    term.backward()
    w = F.softmax(s, 0)
    assert torch.allclose(theta.grad, 0.5 * (w - 1 / 6) * 2 * theta.detach(), atol=1e-6)


# ---- constraint modules --------------------------------------------------------------------------


def test_symmetry_and_class_consistency_values():
    x = torch.randn(2, 1, 4, 4, generator=gen(17))
    sym = (x + x.flip(-1)) / 2
    assert torch.equal(Symmetry()(sym), torch.zeros(2))
    assert float(Symmetry()(x)[0]) == pytest.approx(float(-(x[0] - x[0].flip(-1)).pow(2).mean()))
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    y = torch.tensor([2, 0])
    cc = ClassConsistency(net)
    assert torch.allclose(cc(x, y), F.log_softmax(net(x), -1)[torch.arange(2), y])
    assert not any(p.requires_grad for p in cc.parameters())
    bounded = ClassConsistency(net, bound=0.5)
    assert torch.all(bounded(x * 100, y).abs() <= 0.5)


# ---- rule distillation (digits-sum) ---------------------------------------------------------------


def test_pair_sum_teacher_marginals_equal_brute_force_enumeration():
    from trainer.knowledge.digits_sum import pair_sum_teacher

    logits, s = torch.randn(3, 2, 10, generator=gen(20)), torch.tensor([4, 17, 0])
    p = F.softmax(logits.double(), -1)
    got = pair_sum_teacher(logits, s, C=6.0, lam=0.8).exp()
    for b in range(3):
        q = torch.zeros(10, 10, dtype=torch.float64)
        for i in range(10):
            for j in range(10):
                q[i, j] = p[b, 0, i] * p[b, 1, j] * math.exp(-6.0 * 0.8 * (i + j != int(s[b])))
        q /= q.sum()
        assert torch.allclose(got[b, 0].double(), q.sum(1), atol=1e-6)
        assert torch.allclose(got[b, 1].double(), q.sum(0), atol=1e-6)
    hard = pair_sum_teacher(logits, torch.tensor([0, 18, 25]), hard=True).exp()
    assert torch.allclose(hard[0, :, 0], torch.ones(2), atol=1e-6)  # sum 0: both digits must be 0
    assert torch.allclose(hard[1, :, 9], torch.ones(2), atol=1e-6)
    assert torch.allclose(hard[2], F.softmax(logits[2], -1), atol=1e-6)  # no pair sums to 25: falls back to p


def test_classifier_module_loss_is_plain_cross_entropy_without_the_rule_and_mixes_with_it():
    from trainer.classifier_module import ClassifierModule
    from trainer.knowledge.digits_sum import pair_sum_teacher

    net = nn.Linear(4, 10)
    x_lab, y_lab = torch.randn(5, 4, generator=gen(21)), torch.randint(10, (5,), generator=gen(22))
    batch = (torch.randn(3, 2, 4, generator=gen(23)), torch.tensor([3, 9, 12]))
    m = ClassifierModule(net, pair_sum_teacher, x_lab, y_lab, groups_per_epoch=3, use_rule=False)
    assert torch.equal(m.training_step(batch, 0), F.cross_entropy(net(x_lab), y_lab))
    m = ClassifierModule(net, pair_sum_teacher, x_lab, y_lab, groups_per_epoch=3, pi0=0.9)
    m.groups_seen.fill_(6)  # two epochs: pi = 1 - 0.95^2
    pi = 1 - 0.95 ** 2
    lp = F.log_softmax(net(batch[0].flatten(0, 1)), -1)
    log_q = pair_sum_teacher(net(batch[0].flatten(0, 1)).view(3, 2, 10), batch[1]).flatten(0, 1)
    kl = (log_q.exp() * (log_q - lp)).sum() / 6
    want = (1 - pi) * F.cross_entropy(net(x_lab), y_lab) + pi * kl
    assert float(m.training_step(batch, 0)) == pytest.approx(float(want), abs=1e-5)
    acc = m.accuracy(batch[0], batch[1], torch.zeros(3, 2, dtype=torch.long))
    assert set(acc) == {"acc_p", "acc_q"}


def test_chain_teacher_marginals_equal_brute_force_enumeration():
    """Notes oracle 6: forward-backward marginals and log Z of the chain teacher against summing
    p(y) exp(score(y)) over all K^T label sequences; a hard rule gives its pairs zero mass; a chain with
    every path forbidden falls back to p."""
    import itertools

    from trainer.knowledge.teacher import chain_teacher_marginals

    g = torch.Generator().manual_seed(3)
    B, T, K = 2, 4, 3
    logits = torch.randn(B, T, K, generator=g)
    pair = torch.randn(T - 1, K, K, generator=g)
    unary = torch.randn(B, T, K, generator=g)
    pair[:, 0, 2] = float("-inf")  # hard rule: label 0 is never followed by label 2
    q, log_z = chain_teacher_marginals(logits, pair, unary)
    log_p = torch.log_softmax(logits.double(), -1)
    for b in range(B):
        marg = torch.zeros(T, K, dtype=torch.float64)
        scores = []
        for ys in itertools.product(range(K), repeat=T):
            s = sum(log_p[b, t, y] + unary[b, t, y] for t, y in enumerate(ys))
            s = s + sum(pair[t, ys[t], ys[t + 1]] for t in range(T - 1))
            scores.append(s)
            if torch.isfinite(s):
                for t, y in enumerate(ys):
                    marg[t, y] += torch.exp(s)
        z = torch.logsumexp(torch.stack(scores), 0)
        assert torch.allclose(log_z[b].double(), z, atol=1e-5)
        assert torch.allclose(q[b].double(), marg / torch.exp(z), atol=1e-6)
        # no sequence with 0 -> 2 survives: P(y_t = 0, y_t+1 = 2) = 0, so q sums to 1 per position
        assert torch.allclose(q[b].sum(-1), torch.ones(T), atol=1e-6)
    dead = torch.full((T - 1, K, K), float("-inf"))
    q_dead, z_dead = chain_teacher_marginals(logits, dead)
    assert torch.isinf(z_dead).all() and torch.allclose(q_dead, torch.softmax(logits, -1))
    q0, _ = chain_teacher_marginals(logits, torch.zeros(T - 1, K, K))  # no rule: q = p exactly
    assert torch.allclose(q0, torch.softmax(logits, -1), atol=1e-6)


def test_teacher_set_is_resampled_on_the_device_and_kept_when_the_weights_are_unusable():
    """The diagnostic teacher set is drawn without a host read: usable weights replace it, NaN or all-zero
    weights leave the previous one (as the host-side check used to), and it is read only on access."""
    from trainer.callbacks.knowledge import build_knowledge_callback
    from trainer.config import load_config

    cfg = load_config("gan_digits", ["knowledge.enabled=true", "knowledge.constraint=symmetry",
                                     "knowledge.keep_samples=4", "logging.wandb=false"])
    cb = build_knowledge_callback(cfg)
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    assert cb.teacher_samples is None
    cb._resample(x, torch.full((6,), float("nan")))
    assert cb.teacher_samples is None  # nothing usable yet
    one_hot = torch.zeros(6)
    one_hot[4] = 1.0
    cb._resample(x, one_hot)
    first = cb.teacher_samples
    assert first.shape == (4, 1, 2, 2) and torch.all(first == 4.0)  # all mass on sample 4
    cb._resample(x, torch.full((6,), float("nan")))
    cb._resample(x, torch.zeros(6))
    assert torch.equal(cb.teacher_samples, first)
    other = torch.zeros(6)
    other[1] = 1.0
    cb._resample(x, other)
    assert torch.all(cb.teacher_samples == 1.0)


def test_tempered_flow_samples_carry_the_weight_back_to_the_model():
    """knowledge.temperature != 1: samples come from p_T (prior stds times T), so each weight gets
    log p(x) - log p_T(x), here against the two densities evaluated on the sample's own latents."""
    from models.glow import gaussian_log_prob
    from tests.unit.test_glow import tiny_glow
    from trainer.callbacks.knowledge import tempered_samples

    glow = tiny_glow(num_classes=3)
    y = torch.tensor([0, 1, 2, 1, 0])
    xs, ratio = tempered_samples(glow, 5, 1.0, y, torch.Generator().manual_seed(0))
    assert float(ratio) == 0.0 and xs.shape == (5, 3, 4, 4)
    T = 0.6
    xs, ratio = tempered_samples(glow, 5, T, y, torch.Generator().manual_seed(0))
    latents, priors = glow.encode(xs, y, return_priors=True)
    exact = sum(gaussian_log_prob(z, m, s) - gaussian_log_prob(z, m, s + math.log(T))
                for z, (m, s) in zip(latents, priors))
    # up to the constant D log T, which the self-normalised weights do not see
    torch.testing.assert_close(ratio.double() + glow.n_dims * math.log(T), exact, rtol=1e-6, atol=1e-6)
    assert float(ratio.std()) > 0.1  # not a constant: the weights change


def test_teacher_diagnostic_weighs_classes_by_their_samples():
    """knowledge/f_teacher is E_q f: with weights normalised within each requested class, the classes
    count by their share of the samples, so at lambda = 0 (q = p) it equals f_student exactly."""
    from trainer.callbacks.knowledge import KnowledgeCallback

    cb = KnowledgeCallback.__new__(KnowledgeCallback)
    cb.counters, cb.seed, cb.k, cb._teacher, cb._classes = {"teacher_steps": 0}, 0, {"keep_samples": 4}, None, 3
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])  # unequal counts
    f = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, -7.0, -9.0, 11.0])
    x = torch.randn(8, 1, 2, 2)
    cb.lam = 0.0
    cb._diagnose(x, y, f)
    assert float(cb._device_stats["knowledge/f_teacher"]) == pytest.approx(float(f.mean()))
    cb.lam = 0.5  # within a class q tilts towards larger f; across classes the shares stay
    cb._diagnose(x, y, f)
    per_class = [(torch.softmax(0.5 * f[y == c], 0) * f[y == c]).sum() for c in range(3)]
    expected = sum(float((y == c).sum()) / 8 * float(v) for c, v in enumerate(per_class))
    assert float(cb._device_stats["knowledge/f_teacher"]) == pytest.approx(expected)


def test_weighted_nll_term_drops_neg_inf_samples_from_both_averages():
    """A sample whose constraint value is non-finite (log-weight -inf) counts in neither the importance-
    weighted nor the uniform average: with three equal weights left, w = uniform = 1/3 for them, so the
    term is exactly 0 (keeping it in the uniform average would give 1/3 * 8 - 10/4 = 1/6)."""
    s = torch.tensor([0.0, -math.inf, 0.0, 0.0])
    term, _ = weighted_nll_term(torch.tensor([1.0, 2.0, 3.0, 4.0]), s, alpha=1.0)
    assert abs(float(term)) < 1e-7


@pytest.mark.parametrize("override, message", [
    ("knowledge.temperature=0", "temperature must be > 0"),
    ("knowledge.temperature=-1", "temperature must be > 0"),
    ("knowledge.bound=-1", "knowledge.bound must be non-negative, got -1"),
    ("knowledge.lam=-0.5", "knowledge.lam must be non-negative, got -0.5"),
    ("knowledge.phi_every=0", "knowledge.phi_every must be positive"),
    ("knowledge.ess_min=1.5", "knowledge.ess_min must be in"),
    ("knowledge.samples=-3", "knowledge.samples must be 0"),
    ("knowledge.keep_samples=0", "knowledge.keep_samples must be positive"),
    ("knowledge.learned=true", "needs a constraint with parameters"),
])
def test_knowledge_settings_are_validated(override, message):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config("gan_digits", ["knowledge.enabled=true", "knowledge.constraint=symmetry", override])
    load_config("gan_digits", ["knowledge.enabled=false", override])  # checked only when the callback is on


def test_logged_diagnostics_are_expectations_under_p_by_hand():
    """knowledge/log_z, f_student, f_teacher for f = 0, 1, 2, 3 and lambda = 1: log Z = log mean e^f, pooled
    or (per_class) the class-share-weighted per-class values; with tempered samples (log p/p_T = log r)
    every expectation is weighted back to p. log Z >= lambda E_p f (Jensen) always holds."""
    from trainer.knowledge.teacher import p_diagnostics

    f = torch.tensor([0.0, 1.0, 2.0, 3.0])
    e = torch.exp(f)
    d = p_diagnostics(f, f)
    assert float(d["log_z"]) == pytest.approx(math.log(float(e.mean())))
    assert float(d["f_student"]) == pytest.approx(1.5)
    assert float(d["f_teacher"]) == pytest.approx(float((e * f).sum() / e.sum()))
    assert float(d["log_z"]) >= float(d["f_student"])
    groups = torch.tensor([0, 0, 1, 1])
    d = p_diagnostics(f, f, groups=groups, per_class=True, classes=3)  # class 2 has no samples
    want = 0.5 * math.log((1 + math.e) / 2) + 0.5 * math.log((math.e ** 2 + math.e ** 3) / 2)
    assert float(d["log_z"]) == pytest.approx(want)
    teacher = 0.5 * (math.e * 1) / (1 + math.e) + 0.5 * (2 * math.e ** 2 + 3 * math.e ** 3) / (math.e ** 2 + math.e ** 3)
    assert float(d["f_teacher"]) == pytest.approx(teacher)
    assert float(p_diagnostics(f, f, groups=groups, classes=2)["log_z"]) == pytest.approx(math.log(float(e.mean())))
    r = torch.tensor([3.0, 1.0, 1.0, 1.0])  # p puts 3x the tempered mass on the first sample
    d = p_diagnostics(f, f, log_ratio=torch.log(r))
    assert float(d["f_student"]) == pytest.approx(1.0)
    assert float(d["log_z"]) == pytest.approx(math.log(float((r * e).sum() / r.sum())))
    assert float(d["f_teacher"]) == pytest.approx(float((r * e * f).sum() / (r * e).sum()))
    # a sample whose f overflowed counts nowhere
    d = p_diagnostics(torch.tensor([0.0, float("inf")]), torch.tensor([0.0, float("inf")]))
    assert float(d["f_student"]) == 0.0 and float(d["log_z"]) == 0.0
