"""Training conditional flows: likelihood, RNODE and flow matching with contexts; OT pairing
within contexts keeps x0 | c the base distribution."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import kstest

import cnf
from cnf.losses import flow_matching_loss, nll_loss, ot_pairing, ot_pairing_within_contexts


def labelled_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x | c=0 near (+4, 0) and x | c=1 near (-4, 0): global OT would pair them with x0 of
    their own side."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 0.3
    x[:, 0] += 4 - 8 * labels.double()
    return x, torch.nn.functional.one_hot(labels, 2).double()


def test_ot_pairing_within_contexts_keeps_x0_given_c_standard_normal() -> None:
    gen = torch.Generator().manual_seed(0)
    within, across = [], []
    for _ in range(60):
        x1, c = labelled_data(64, gen)
        x0 = torch.randn(64, 2, generator=gen, dtype=torch.float64)
        perm = ot_pairing_within_contexts(x0, x1, c)
        assert sorted(perm.tolist()) == list(range(64))  # a permutation ...
        assert torch.equal(c[perm], c)  # ... inside each group of equal context
        within.append(x0[perm][c[:, 0] == 1, 0])
        across.append(x0[ot_pairing(x0, x1)][c[:, 0] == 1, 0])
    within_c0, across_c0 = torch.cat(within).numpy(), torch.cat(across).numpy()
    assert kstest(within_c0, "norm").pvalue > 0.01
    assert abs(within_c0.mean()) < 4 / len(within_c0) ** 0.5
    # pairing across contexts would have made x0 depend on c (the test can fail)
    assert across_c0.mean() > 0.5 and kstest(across_c0, "norm").pvalue < 1e-6


def test_ot_pairing_with_continuous_contexts_is_the_independent_coupling() -> None:
    gen = torch.Generator().manual_seed(1)
    x0, x1, c = (torch.randn(32, 2, generator=gen) for _ in range(3))
    assert torch.equal(ot_pairing_within_contexts(x0, x1, c), torch.arange(32))
    # one shared context is one group: plain OT
    assert torch.equal(ot_pairing_within_contexts(x0, x1, c[:1]), ot_pairing(x0, x1))


def small_conditional_flow(**field_options) -> cnf.CNF:
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(16, 16), context_dim=2, **field_options)
    return cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.1)).double()


@pytest.mark.parametrize("objective", ["likelihood", "rnode", "flow_matching", "ot_flow_matching"])
def test_losses_take_the_context_and_reach_its_gradient(objective: str) -> None:
    flow = small_conditional_flow(embedding=torch.nn.Linear(2, 3).double())
    x, c = labelled_data(16, torch.Generator().manual_seed(2))
    if objective == "likelihood":
        loss = nll_loss(flow, x, context=c)
    elif objective == "rnode":
        loss = nll_loss(flow, x, context=c, kinetic_weight=0.1, jacobian_weight=0.1)
    else:
        loss = flow_matching_loss(
            flow, x, context=c, coupling="ot" if objective.startswith("ot") else "independent"
        )
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.field.embedding.parameters())
    with pytest.raises(ValueError, match="got None"):
        nll_loss(flow, x) if objective in ("likelihood", "rnode") else flow_matching_loss(flow, x)


@pytest.mark.parametrize("objective", ["likelihood", "flow_matching"])
def test_train_with_contexts_learns_the_conditional(objective: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x, c = labelled_data(512, gen)
    val_x, val_c = labelled_data(128, gen)
    flow = small_conditional_flow()
    before = cnf.evaluate_nll(flow, val_x, context=val_c)
    iters = 60 if objective == "likelihood" else 400
    result = cnf.train(
        flow,
        x,
        val_x,
        context=c,
        val_context=val_c,
        iters=iters,
        batch_size=128,
        lr=1e-2,
        objective=objective,
        val_every=iters,
        progress=False,
    )
    after = cnf.evaluate_nll(flow, val_x, context=val_c)
    swapped = cnf.evaluate_nll(flow, val_x, context=val_c.flip(1))  # the wrong labels
    assert result.val_nll == pytest.approx(after, abs=1e-3)
    assert after < before - 1.0 and swapped > after + 3.0


def test_train_rejects_mismatched_contexts() -> None:
    flow = small_conditional_flow()
    x, c = labelled_data(20, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"shape \(19, 2\) does not match the batch of 20"):
        cnf.train(flow, x, context=c[:19], iters=1, progress=False)
    with pytest.raises(ValueError, match="got None"):
        cnf.train(flow, x, iters=1, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        cnf.train(cnf.CNF(cnf.MLPField(2, hidden=(4,))), x.float(), context=c, iters=1, progress=False)


def test_guided_linear_field_equals_the_field_at_a_scaled_context() -> None:
    # u = A x + B c with a null context 0: the guided field is A x + (1 + w) B c.
    from test_conditional import linear_conditional_flow

    from cnf.guidance import GuidedField

    flow = linear_conditional_flow()
    guided = cnf.CNF(GuidedField(flow.field, weight=1.5), solver=flow.solver).double()
    z = torch.randn(6, 2, dtype=torch.float64)
    c = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(guided.inverse(z, context=c), flow.inverse(z, context=2.5 * c))
        torch.testing.assert_close(guided.log_prob(z, context=c[0]), flow.log_prob(z, context=2.5 * c[0]))
    assert guided.sample(4, context=c[:2]).shape == (4, 2, 2)
    with pytest.raises(ValueError, match="needs a conditional field"):
        GuidedField(cnf.MLPField(2), weight=1.0)


def test_with_null_contexts_adds_unlabelled_copies() -> None:
    from cnf.guidance import with_null_contexts

    x, c = labelled_data(100, torch.Generator().manual_seed(5))
    x2, c2 = with_null_contexts(x, c, rate=0.2, generator=torch.Generator().manual_seed(0))
    assert x2.shape == (120, 2) and c2.shape == (120, 2)
    assert torch.equal(x2[:100], x) and (c2[100:] == 0).all() and (c2[:100].sum(1) == 1).all()
    assert all((row == x).all(1).any() for row in x2[100:])  # copies of training rows
    with pytest.raises(ValueError, match=r"rate must be a float in \(0, 1\], got 0"):
        with_null_contexts(x, c, rate=0)
