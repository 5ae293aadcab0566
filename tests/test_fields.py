"""MLPField's fused layers and its forward-mode divergence against autograd (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import cnf
from cnf.divergence import exact_divergence_loop
from cnf.fields import ACTIVATIONS, TIME_EMBEDDINGS, AutogradField
from cnf.fields.mlp import LOGISTIC, divergence_chunk_samples, forward_mode_divergence, logistic_form
from cnf.flow import AugmentedDynamics


def random_field(dim: int, activation: str, embedding: str, hidden: tuple[int, ...] = (8, 8)) -> cnf.MLPField:
    torch.manual_seed(dim + len(hidden))
    field = cnf.MLPField(dim, hidden=hidden, activation=activation, time_embedding=embedding).double()
    with torch.no_grad():  # larger weights so that every activation works off its linear part
        for p in field.parameters():
            p.mul_(2.0)
    return field


def autograd_velocity_and_divergence(field: nn.Module, t: torch.Tensor, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    f = field(t, x)
    return f, exact_divergence_loop(f, x, create_graph=False)


# chunk_rows=4 with dim 3 cuts the 11 points into chunks of one; 6 into chunks of 2 (and a
# last, shorter one); the default (None, sized by bytes) takes the batch whole.
CHUNKS = (4, 6, None)


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("embedding", TIME_EMBEDDINGS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("dim", "hidden"), [(1, (8, 8)), (3, (8, 8)), (3, (5,)), (2, ()), (3, (4, 7, 5)), (3, (6, 8, 7, 5))])
def test_forward_mode_divergence_equals_autograd(
    activation: str, embedding: str, dim: int, hidden: tuple[int, ...], chunk_rows: int
) -> None:
    field = random_field(dim, activation, embedding, hidden)
    field.divergence_chunk_rows = chunk_rows
    x = torch.randn(11, dim, dtype=torch.float64)
    t = torch.tensor(0.37, dtype=torch.float64)
    f_expected, div_expected = autograd_velocity_and_divergence(field, t, x)
    with torch.no_grad():
        f, div = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(f, f_expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(div, div_expected, rtol=0, atol=1e-12)
    assert div.abs().max() > 1e-3  # the check is not trivially 0 == 0
    with torch.enable_grad():  # the out-of-place path that autograd can differentiate
        f_graph, div_graph = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(f_graph.detach(), f, rtol=0, atol=1e-12)
    torch.testing.assert_close(div_graph.detach(), div, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_rows", CHUNKS)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_forward_mode_divergence_in_float32_is_as_accurate_as_autograd(
    activation: str, chunk_rows: int
) -> None:
    # Truth from float64 autograd; the float32 forward mode must be as close to it as float32
    # autograd is (a few float32 roundings of a width-8 sum), not merely "close".
    field64 = random_field(4, activation, "concatsquash", (8, 8, 8))
    field32 = copy.deepcopy(field64).float()
    field32.divergence_chunk_rows = chunk_rows
    x = torch.randn(64, 4, dtype=torch.float64)
    t = torch.tensor(0.81, dtype=torch.float64)
    _, truth = autograd_velocity_and_divergence(field64, t, x)
    _, div_autograd32 = autograd_velocity_and_divergence(field32, t.float(), x.float())
    with torch.no_grad():
        _, div32 = field32.velocity_and_divergence(t.float(), x.float())
    assert div32.dtype == torch.float32
    scale = truth.abs().max().item()
    error, error_autograd = (
        (div32.double() - truth).abs().max().item(),
        (div_autograd32.double() - truth).abs().max().item(),
    )
    assert error <= max(4 * error_autograd, 2e-6 * scale), (error, error_autograd, scale)


@pytest.mark.parametrize("hidden", [(6,), (6, 5), (6, 5, 7), (6, 5, 7, 4)])
def test_logistic_form_is_the_same_tanh_network(hidden: tuple[int, ...]) -> None:
    # An unconditional tanh field scores through logistic_form (sigmoid activations, rewritten
    # affine maps): the same velocity and divergence as the tanh network with its own weights.
    field = random_field(3, "tanh", "concatsquash", hidden)
    x = torch.randn(13, 3, dtype=torch.float64)
    tt = torch.tensor([[0.3]], dtype=torch.float64)
    affines = [layer.affine(tt) for layer in field.layers]
    with torch.no_grad():
        f_tanh, div_tanh = forward_mode_divergence(affines, list(field.activations), x)
        f_logistic, div_logistic = forward_mode_divergence(logistic_form(affines), [LOGISTIC] * len(hidden), x)
    torch.testing.assert_close(f_logistic, f_tanh, rtol=0, atol=1e-12)
    torch.testing.assert_close(div_logistic, div_tanh, rtol=0, atol=1e-12)
    assert not torch.allclose(logistic_form(affines)[0][0], affines[0][0])  # really rewritten
    with torch.no_grad():  # the field uses it by default; the knob turns it off, same numbers
        f_default, div_default = field.velocity_and_divergence(tt, x)
        field.logistic_tanh = False
        f_off, div_off = field.velocity_and_divergence(tt, x)
    torch.testing.assert_close(f_default, f_off, rtol=0, atol=1e-12)
    torch.testing.assert_close(div_default, div_off, rtol=0, atol=1e-12)


def test_default_chunks_cut_a_large_batch_and_keep_the_trace() -> None:
    # The default chunk is sized by bytes: 3 MiB / ((3 + 3 * 3) * 64 * 8) = 512 float64 samples,
    # so 1,200 points take three chunks (the last one shorter), in scoring and in training.
    field = random_field(3, "tanh", "concatsquash", (64, 64, 64))
    assert field.divergence_chunk_rows is None
    assert divergence_chunk_samples(3, (64, 64, 64), 8) == 512
    assert divergence_chunk_samples(3, (64, 64, 64), 4) == 1024  # float32: twice as many
    x = torch.randn(1200, 3, dtype=torch.float64)
    t = torch.tensor(0.55, dtype=torch.float64)
    f_expected, div_expected = autograd_velocity_and_divergence(field, t, x)
    with torch.no_grad():
        f, div = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(f, f_expected.detach(), rtol=0, atol=1e-11)
    torch.testing.assert_close(div, div_expected, rtol=0, atol=1e-11)
    with torch.enable_grad():
        _, div_graph = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(div_graph.detach(), div_expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("embedding", TIME_EMBEDDINGS)
def test_fused_layers_equal_the_per_sample_time_formula(embedding: str) -> None:
    # One shared time takes the fused x W(t)^T + b(t); one time per sample the layer's formula.
    field = random_field(3, "tanh", embedding)
    x = torch.randn(6, 3, dtype=torch.float64)
    shared = field(torch.tensor(0.6, dtype=torch.float64), x)
    per_sample = field(torch.full((6,), 0.6, dtype=torch.float64), x)
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_rows", (6, None))
def test_forward_mode_parameter_gradients_equal_double_backward(chunk_rows: int) -> None:
    field = random_field(3, "tanh", "concatsquash")
    field.divergence_chunk_rows = chunk_rows
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.2, dtype=torch.float64)

    def gradients(use_forward_mode: bool) -> list[torch.Tensor]:
        if use_forward_mode:
            f, div = field.velocity_and_divergence(t, x)
        else:
            f = field(t, x)
            div = exact_divergence_loop(f, x, create_graph=True)
        loss = (div**2).sum() + (f**2).sum()
        return torch.autograd.grad(loss, [x, *field.parameters()])

    for got, expected in zip(gradients(True), gradients(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_cnf_log_prob_and_gradient_equal_the_autograd_path() -> None:
    field = random_field(2, "softplus", "concatsquash")
    solver = cnf.Solver("rk4", step_size=0.05)  # fixed steps: both take the same evaluations
    fast, reference = cnf.CNF(field, solver=solver), cnf.CNF(AutogradField(field), solver=solver)
    assert AugmentedDynamics(field, "exact", None).analytic
    assert not AugmentedDynamics(AutogradField(field), "exact", None).analytic
    x = torch.randn(20, 2, dtype=torch.float64)
    results = []
    for flow in (fast, reference):
        field.zero_grad()
        log_p = flow.log_prob(x)
        log_p.sum().backward()
        results.append((log_p.detach(), [p.grad.clone() for p in field.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for got, expected in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_other_divergences_and_activations_keep_autograd() -> None:
    custom = cnf.MLPField(2, hidden=(8,), activation=nn.Softsign())
    assert not custom.has_analytic_divergence
    assert not AugmentedDynamics(custom, "exact", None).analytic
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="Softsign"):
        custom.velocity_and_divergence(0.5, x)
    with torch.no_grad():  # still scores, through autograd
        assert torch.isfinite(cnf.CNF(custom).log_prob(x)).all()
    field = cnf.MLPField(2, hidden=(8,))
    assert not AugmentedDynamics(field, "hutchinson", torch.ones(4, 2)).analytic
    assert not AugmentedDynamics(field, "exact", torch.ones(4, 2), regularization=True).analytic


def test_forward_mode_needs_one_shared_time() -> None:
    field = cnf.MLPField(2, hidden=(8,))
    with pytest.raises(ValueError, match=r"one time shared by the batch.*\(4,\)"):
        field.velocity_and_divergence(torch.rand(4), torch.randn(4, 2))


def test_compiled_forward_mode_equals_eager_without_recompiling_per_batch_size(monkeypatch) -> None:
    # Solver(compile=True) scores through torch.compile; chunks of one fixed size (the last one
    # zero-padded) mean one compilation serves every batch size. Traced with the "eager"
    # backend (no C++ code generation, seconds instead of tens of seconds);
    # benchmarks/work_precision.py runs the default inductor backend.
    from torch._dynamo.utils import counters

    monkeypatch.setattr(cnf.fields.mlp, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(cnf.fields.mlp, "_COMPILED_KERNELS", {})
    field = random_field(3, "softplus", "concatsquash", (6, 5))
    field.divergence_chunk_rows = 12  # chunks of 4 samples
    t = torch.tensor(0.3, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for batch in (9, 4, 2):
            x = torch.randn(batch, 3, dtype=torch.float64)
            f, div = field.velocity_and_divergence(t, x, compiled=True)
            f_eager, div_eager = field.velocity_and_divergence(t, x)
            torch.testing.assert_close(f, f_eager, rtol=0, atol=1e-12)
            torch.testing.assert_close(div, div_eager, rtol=0, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1
    flow = cnf.CNF(field, solver=cnf.Solver("rk4", step_size=0.25, compile=True))
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        compiled = flow.log_prob(x)
        flow.solver = flow.solver.with_(compile=False)
        torch.testing.assert_close(compiled, flow.log_prob(x), rtol=0, atol=1e-12)
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(TypeError, match="compile must be a bool, got 'yes'"):
        cnf.Solver(compile="yes")


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("mode", ["concat", "film"])
@pytest.mark.parametrize("shared", [False, True])
def test_chunked_forward_mode_with_context_equals_autograd(
    mode: str, shared: bool, compiled: bool, monkeypatch
) -> None:
    # Per-sample context terms are cut with the chunks (and zero-padded for the compiled
    # kernel); a context shared by the batch (1, k) broadcasts into every chunk.
    monkeypatch.setattr(cnf.fields.mlp, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(cnf.fields.mlp, "_COMPILED_KERNELS", {})
    torch.manual_seed(3)
    field = cnf.MLPField(3, hidden=(6, 5), context_dim=2, context_mode=mode).double()
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))  # FiLM starts as the identity: move off it
    field.divergence_chunk_rows = 12  # chunks of 4 samples, the last one of 1
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1 if shared else 9, 2, dtype=torch.float64)
    t = torch.tensor(0.7, dtype=torch.float64)
    f = field(t, x, context=c)
    expected = exact_divergence_loop(f, x, create_graph=False)
    with torch.no_grad():
        u, div = field.velocity_and_divergence(t, x, context=c, compiled=compiled)
    torch.testing.assert_close(u, f.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(div, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hidden", [(4, 7, 5), (6, 8, 7, 5)])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_without_the_folds_gives_the_same_divergence(
    hidden: tuple[int, ...], grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above MAX_FOLD_NUMEL the first and last hidden layers are carried as columns too."""
    field = random_field(3, "tanh", "concatsquash", hidden)
    x = torch.randn(9, 3, dtype=torch.float64)
    t = torch.tensor(0.61, dtype=torch.float64)
    _, div_expected = autograd_velocity_and_divergence(field, t, x)
    monkeypatch.setattr(cnf.fields.mlp, "MAX_FOLD_NUMEL", 0)
    with torch.set_grad_enabled(grad):
        _, div = field.velocity_and_divergence(t, x)
    torch.testing.assert_close(div.detach(), div_expected.detach(), rtol=0, atol=1e-12)


def test_sigmoid_tanh_is_tanh_with_tanh_derivatives() -> None:
    """The default activation computes tanh as 2 sigmoid(2x) - 1 (faster on CPUs)."""
    from cnf.fields.mlp import Tanh

    x32 = torch.linspace(-20, 20, 40_001)
    assert (Tanh()(x32).double() - torch.tanh(x32.double())).abs().max() < 2e-7
    x64 = x32.double()
    assert (Tanh()(x64) - torch.tanh(x64)).abs().max() < 1e-15
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Tanh(), (x,))
    assert torch.autograd.gradgradcheck(Tanh(), (x,))  # Hutchinson / RNODE training differentiate twice
    assert isinstance(cnf.MLPField(2).activations[0], nn.Tanh)


def test_log_time_features_resolve_the_end_of_the_path_and_round_trip(tmp_path) -> None:
    # concatsquash_log gates each layer on (t, log(1 - t + eps)): the second column is what the
    # layers read (a field with its log weights zeroed changes), t is clipped at 1 (no NaN past
    # the end of the path), and a checkpoint rebuilds the same field from its config.
    from cnf.fields.mlp import LOG_TIME_EPS

    field = random_field(3, "silu", "concatsquash_log")
    tt = torch.tensor([[0.25], [1.0], [1.5]], dtype=torch.float64)
    expected = torch.tensor([[0.25, math.log(0.75 + LOG_TIME_EPS)], [1.0, math.log(LOG_TIME_EPS)]], dtype=torch.float64)
    features = field.time_features(tt)
    torch.testing.assert_close(features[:2], expected, rtol=0, atol=1e-12)
    assert features[2, 1] == features[1, 1]
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor(0.99, dtype=torch.float64)
    ablated = copy.deepcopy(field)
    with torch.no_grad():
        for layer in ablated.layers:
            layer.gate.weight[:, 1] = 0
            layer.shift.weight[:, 1] = 0
    assert (field(t, x) - ablated(t, x)).abs().max() > 1e-3
    flow = cnf.CNF(field)
    cnf.save_checkpoint(tmp_path / "f.pt", flow)
    restored, _ = cnf.load_checkpoint(tmp_path / "f.pt")
    assert restored.field.time_embedding == "concatsquash_log"
    torch.testing.assert_close(restored.field.double()(t, x), field(t, x), rtol=0, atol=1e-6)
