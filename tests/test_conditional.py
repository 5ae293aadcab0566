"""Conditional flows p(x | c): closed forms, broadcasting, gradients and bad contexts (float64)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from scipy.stats import multivariate_normal
from torch import nn

import cnf
from cnf.divergence import exact_divergence_loop
from cnf.fields import CONTEXT_MODES

TIGHT = cnf.Solver(method="dopri5", rtol=1e-10, atol=1e-10)
A = np.array([[-0.4, 0.7], [-0.3, 0.2]])
B = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0]])


def linear_conditional_flow(solver: cnf.Solver = TIGHT) -> cnf.CNF:
    """u(x, t, c) = A x + B c built from MLPField's own layers (no hidden layer, concat time
    with a zero time weight, the context as a per-sample bias)."""
    field = cnf.MLPField(2, hidden=(), time_embedding="concat", context_dim=3)
    with torch.no_grad():
        field.layers[0].linear.weight.copy_(torch.as_tensor(np.hstack([A, np.zeros((2, 1))])))
        field.layers[0].linear.bias.zero_()
        field.context_layers[0].weight.copy_(torch.as_tensor(B))
    return cnf.CNF(field, solver=solver).double()


def closed_form(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x(1) = e^A x(0) + A^-1 (e^A - I) B c: mean per context and the shared covariance."""
    e = expm(A)
    shift = np.linalg.solve(A, e - np.eye(2)) @ B
    return c @ shift.T, e @ e.T


def random_conditional_field(mode: str, embedding: nn.Module | None = None) -> cnf.MLPField:
    torch.manual_seed(3)
    field = cnf.MLPField(3, hidden=(8, 8), context_dim=2, context_mode=mode, embedding=embedding).double()
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(2.0)
    return field


def test_linear_conditional_field_matches_scipy() -> None:
    flow = linear_conditional_flow()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64) * 2
    c = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    means, cov = closed_form(c.numpy())
    expected = [multivariate_normal(means[i], cov).logpdf(x[i].numpy()) for i in range(7)]
    with torch.no_grad():
        got = flow.log_prob(x, context=c)
        one = flow.log_prob(x, context=c[2])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-7)
    shared = multivariate_normal(means[2], cov).logpdf(x.numpy())
    np.testing.assert_allclose(one.numpy(), shared, rtol=1e-7, atol=1e-7)
    assert np.ptp(expected) > 1.0  # the context matters in this check


def test_sample_shapes_and_per_context_densities() -> None:
    flow = linear_conditional_flow()
    c = torch.tensor([[0.0, 0.0, 0.0], [3.0, -1.0, 2.0], [-2.0, 1.0, 0.5]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x, log_prob = flow.sample_and_log_prob(5, context=c, generator=gen)
        assert flow.sample(4, context=c).shape == (4, 3, 2)
        assert flow.sample(4, context=c[1]).shape == (4, 2)
    assert x.shape == (5, 3, 2) and log_prob.shape == (5, 3)
    means, cov = closed_form(c.numpy())
    for b in range(3):  # column b was drawn from p(x | c_b)
        expected = multivariate_normal(means[b], cov).logpdf(x[:, b].numpy())
        np.testing.assert_allclose(log_prob[:, b].numpy(), expected, rtol=1e-7, atol=1e-7)
    # and the moments of many draws of one context match the closed form
    with torch.no_grad():
        many = flow.sample(4000, context=c[1], generator=gen).numpy()
    np.testing.assert_allclose(many.mean(0), means[1], atol=4 * np.sqrt(np.diag(cov) / 4000).max())


def test_shared_context_equals_expanded_context() -> None:
    flow = cnf.CNF(random_conditional_field("film"), solver=TIGHT).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            flow.log_prob(x, context=c), flow.log_prob(x, context=c.expand(6, 2)), rtol=0, atol=1e-10
        )
        z = torch.randn(6, 3, dtype=torch.float64)
        torch.testing.assert_close(
            flow.inverse(z, context=c), flow.inverse(z, context=c.unsqueeze(0)), rtol=0, atol=1e-10
        )
        path = flow.trajectory(z, [0.0, 0.5, 1.0], context=c)
        torch.testing.assert_close(path[-1], flow.inverse(z, context=c), rtol=0, atol=1e-8)
        # transform and inverse are each other's inverse, per sample context
        cs = torch.randn(6, 2, dtype=torch.float64)
        back, _ = flow.transform(flow.inverse(z, context=cs), context=cs)
        torch.testing.assert_close(back, z, rtol=1e-7, atol=1e-7)
        # the path density at t=0 is the base density
        torch.testing.assert_close(
            flow.log_prob(x, 0.0, context=cs), cnf.StandardNormal(3).double().log_prob(x), rtol=0, atol=0
        )


@pytest.mark.parametrize("mode", CONTEXT_MODES)
@pytest.mark.parametrize("with_embedding", [False, True])
def test_forward_mode_divergence_with_context_equals_autograd(mode: str, with_embedding: bool) -> None:
    embedding = nn.Sequential(nn.Linear(2, 4), nn.Tanh()) if with_embedding else None
    field = random_conditional_field(mode, embedding)
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 2, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    f = field(t, x, context=c)
    expected = exact_divergence_loop(f, x, create_graph=False)
    with torch.no_grad():
        u, div = field.velocity_and_divergence(t, x, context=c)
    torch.testing.assert_close(u, f.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-12)
    # the context changes both the velocity and (FiLM, or through the hidden units) the divergence
    with torch.no_grad():
        u_other, div_other = field.velocity_and_divergence(t, x, context=c + 1)
    assert (u - u_other).abs().max() > 1e-3 and (div - div_other).abs().max() > 1e-3


def test_per_sample_time_with_context_equals_shared_time() -> None:
    field = random_conditional_field("concat")
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    shared = field(torch.tensor(0.3, dtype=torch.float64), x, context=c)
    per_sample = field(torch.full((5,), 0.3, dtype=torch.float64), x, context=c)
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", CONTEXT_MODES)
def test_adjoint_gradients_for_context_and_embedding_equal_direct(mode: str) -> None:
    embedding = nn.Sequential(nn.Linear(2, 4), nn.Tanh()).double()
    field = random_conditional_field(mode, embedding)
    x = torch.randn(6, 3, dtype=torch.float64)
    c0 = torch.randn(6, 2, dtype=torch.float64)
    grads = {}
    for adjoint in (False, True):
        solver = cnf.Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint)
        flow = cnf.CNF(field, solver=solver).double()
        c = c0.clone().requires_grad_(True)
        field.zero_grad()
        flow.log_prob(x, context=c).sum().backward()
        grads[adjoint] = (c.grad.clone(), [p.grad.clone() for p in embedding.parameters()])
        assert flow.stats.nfe_backward > 0 if adjoint else True
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-6, atol=1e-7)
    for got, expected in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert grads[False][0].abs().max() > 1e-3


def test_adjoint_context_gradient_through_sampling() -> None:
    field = random_conditional_field("concat")
    z = torch.randn(4, 3, dtype=torch.float64)
    c0 = torch.randn(2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        flow = cnf.CNF(field, solver=cnf.Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint)).double()
        c = c0.clone().requires_grad_(True)
        flow.inverse(z, context=c).pow(2).sum().backward()
        grads.append(c.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)


def test_concurrent_calls_with_different_contexts_do_not_mix() -> None:
    flow = cnf.CNF(random_conditional_field("concat"), solver=cnf.Solver(rtol=1e-8, atol=1e-8)).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    contexts = [torch.full((2,), float(i), dtype=torch.float64) for i in range(4)]
    with torch.no_grad():
        expected = [flow.log_prob(x, context=c) for c in contexts]
    results: dict[int, torch.Tensor] = {}

    def score(i: int) -> None:
        with torch.no_grad():
            results[i] = flow.log_prob(x, context=contexts[i])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=0)
    assert (expected[0] - expected[3]).abs().max() > 1e-3
    assert not any(isinstance(v, torch.Tensor) and v.shape == (2,) for v in vars(flow.field).values())


def test_unconditional_flow_is_unchanged_by_an_empty_context_path() -> None:
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(8,))
    flow = cnf.CNF(field).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), flow.log_prob(x, context=None))
    assert flow.context_dim is None and "context_dim" not in field.config()


@pytest.mark.parametrize(
    ("context", "match"),
    [
        (torch.zeros(3), r"shape \(2,\) or \(batch, 2\); got shape \(3,\)"),
        (torch.zeros(4, 3), r"got shape \(4, 3\)"),
        (torch.zeros(3, 2), r"shape \(3, 2\) does not match the batch of 5"),
        (torch.tensor([0.0, float("nan")]), r"shape \(2,\) must be finite"),
        (torch.zeros(2, 2, 2), r"got shape \(2, 2, 2\)"),
        (None, r"conditional \(context_dim=2\).*got None"),
        ([0.0, 1.0], "must be a torch.Tensor"),
    ],
)
def test_bad_contexts_raise(context: object, match: str) -> None:
    flow = cnf.CNF(random_conditional_field("concat")).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    error = TypeError if isinstance(context, list) else ValueError
    with pytest.raises(error, match=match):
        flow.log_prob(x, context=context)
    with pytest.raises(error, match=match.replace("5", "[0-9]+")):
        flow.inverse(x, context=context)


def test_bad_contexts_raise_for_sampling() -> None:
    flow = cnf.CNF(random_conditional_field("concat")).double()
    with pytest.raises(ValueError, match=r"got shape \(4, 5\)"):
        flow.sample(3, context=torch.zeros(4, 5))
    with pytest.raises(ValueError, match="got None"):
        flow.sample(3)


def test_context_given_to_unconditional_flows_raises() -> None:
    x = torch.randn(5, 2)
    for flow in (cnf.CNF(cnf.MLPField(2, hidden=(4,))), cnf.PlanarFlow(2, 3)):
        with pytest.raises(ValueError, match=r"given \(shape \(2,\)\) but this flow is unconditional"):
            flow.log_prob(x, context=torch.zeros(2))
        with pytest.raises(ValueError, match="unconditional"):
            flow.sample(2, context=torch.zeros(3, 2))


def test_bad_field_arguments_raise() -> None:
    with pytest.raises(ValueError, match="context_dim must be a positive int or None, got 0"):
        cnf.MLPField(2, context_dim=0)
    with pytest.raises(ValueError, match="unknown context_mode 'gate'"):
        cnf.MLPField(2, context_dim=1, context_mode="gate")
    with pytest.raises(ValueError, match="needs context_dim"):
        cnf.MLPField(2, embedding=nn.Linear(1, 2))


# -- conditional planar flow -------------------------------------------------------------------


def conditional_planar() -> cnf.ConditionalPlanarFlow:
    torch.manual_seed(5)
    flow = cnf.ConditionalPlanarFlow(2, 4, context_dim=3, hidden=(8,)).double()
    with torch.no_grad():  # strong context effects, u large enough to test the constraint
        for p in flow.context_net.parameters():
            p.mul_(20.0)
        flow.u.mul_(20.0)
    return flow


def test_conditional_planar_log_det_equals_autograd_jacobian() -> None:
    flow = conditional_planar()
    z = torch.randn(6, 2, dtype=torch.float64)
    c = torch.randn(6, 3, dtype=torch.float64)
    x, log_prob = flow.inverse_and_log_prob(z, context=c)
    base = cnf.StandardNormal(2).double()
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda v, ci=c[i]: flow.inverse(v, context=ci), z[i : i + 1])
        logdet = torch.linalg.slogdet(jac.reshape(2, 2))[1]
        torch.testing.assert_close(log_prob[i], base.log_prob(z[i]) - logdet, rtol=0, atol=1e-10)
    # every per-sample layer satisfies the invertibility constraint w . u_hat > -1
    w, _, u_hat = flow.layer_parameters(c)
    assert w.shape == (6, 4, 2) and bool(((w * u_hat).sum(-1) > -1).all())
    assert ((w * (flow.u + 0 * w)).sum(-1) < -1).any()  # the raw u would violate it
    # scoring inverts sampling, per context, and agrees with the sampled density
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x, context=c), log_prob, rtol=0, atol=1e-9)
    assert flow.sample(3, context=c).shape == (3, 6, 2)
    with torch.no_grad():
        torch.testing.assert_close(flow.trajectory(z, [0.0, 1.0], context=c)[-1], x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="got None"):
        flow.log_prob(x)
