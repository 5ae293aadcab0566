"""VAEs with flow posteriors: bounds against a linear-Gaussian model's closed form, log|det| of
the amortised flows against autograd, gradients, data, training hooks and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import logm, sqrtm
from scipy.stats import multivariate_normal
from torch import nn

from cnf import CNF, Solver
from cnf.checkpoint import load_checkpoint
from cnf.data.binarized import load_binarized
from cnf.losses import elbo_loss, kl_warmup_weight
from cnf.training import EarlyStopping, TrainSettings, train
from cnf.vae import POSTERIORS, VAE, Posterior
from cnf.vae.posteriors import standard_normal_log_prob

D, LATENT, NOISE = 5, 2, 0.5


def linear_gaussian(seed: int = 0, orthogonal: bool = True) -> dict[str, np.ndarray]:
    """p(z) = N(0, I_2), p(x | z) = N(W z + b, NOISE^2 I_5): posterior and evidence in closed form."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, LATENT))
    if orthogonal:  # orthogonal columns: a diagonal posterior covariance
        W = np.linalg.qr(W)[0] * np.array([1.5, 0.7])
    b = rng.normal(size=D)
    cov = np.linalg.inv(np.eye(LATENT) + W.T @ W / NOISE**2)
    return {"W": W, "b": b, "cov": cov, "gain": cov @ W.T / NOISE**2}


def evidence(model: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    W, b = model["W"], model["b"]
    dist = multivariate_normal(b, W @ W.T + NOISE**2 * np.eye(D))
    return torch.as_tensor(dist.logpdf(x.numpy()))


class GaussianDecoder(nn.Module):
    def __init__(self, model: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(model["W"]))
        self.b = nn.Parameter(torch.as_tensor(model["b"]))

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W.T + self.b

    def log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        r = (x - self.mean(z)) / NOISE
        return -0.5 * (r * r).sum(-1) - D * math.log(NOISE) - 0.5 * D * math.log(2 * math.pi)


class LinearEncoder(nn.Module):
    """q0(z | x) = N(G (x - b) + shift, diag(exp(2 log_std))); h(x) = x."""

    context_dim = D

    def __init__(self, gain: np.ndarray, b: np.ndarray, log_std: np.ndarray) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.as_tensor(gain))
        self.b = torch.as_tensor(b)
        self.log_std = nn.Parameter(torch.as_tensor(log_std))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = (x - self.b) @ self.gain.T
        return mean, self.log_std.expand_as(mean), x


class LinearContextField(nn.Module):
    """u(z, t, h) = A z: a conditional field (it takes the context) that ignores the context."""

    def __init__(self, A: np.ndarray) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.as_tensor(A))
        self.dim, self.context_dim = LATENT, D

    def forward(self, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T


def data(model: dict[str, np.ndarray], n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT, generator=g, dtype=torch.float64)
    return (
        z @ torch.as_tensor(model["W"]).T
        + torch.as_tensor(model["b"])
        + NOISE * torch.randn(n, D, generator=g, dtype=torch.float64)
    )


def exact_gaussian_vae(model: dict[str, np.ndarray]) -> VAE:
    encoder = LinearEncoder(model["gain"], model["b"], 0.5 * np.log(np.diag(model["cov"])))
    return VAE(D, LATENT, "gaussian", encoder=encoder, decoder=GaussianDecoder(model)).double()


def test_elbo_equals_log_evidence_for_the_exact_diagonal_posterior() -> None:
    model = linear_gaussian()
    assert abs(model["cov"][0, 1]) < 1e-12
    x = data(model)
    vae = exact_gaussian_vae(model)
    log_px = evidence(model, x)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.testing.assert_close(vae.elbo(x), log_px, rtol=0, atol=1e-10)
        torch.testing.assert_close(vae.iwae_bound(x, 7), log_px, rtol=0, atol=1e-10)


def test_cnf_posterior_is_exact_for_a_correlated_posterior_where_the_gaussian_is_not() -> None:
    """Correlated true posterior N(m, S): the linear CNF z -> S^(1/2) z applied to
    q0 = N(S^(-1/2) m, I) is exact, so its ELBO (log q from the continuity equation) is log p(x)."""
    model = linear_gaussian(seed=3, orthogonal=False)
    assert abs(model["cov"][0, 1]) > 0.01
    root = np.real(sqrtm(model["cov"]))
    encoder = LinearEncoder(np.linalg.solve(root, model["gain"]), model["b"], np.zeros(LATENT))
    flow = CNF(LinearContextField(np.real(logm(root))), solver=Solver(rtol=1e-10, atol=1e-10))
    vae = VAE(
        D, LATENT, Posterior(LATENT, D, flow=flow), encoder=encoder, decoder=GaussianDecoder(model)
    ).double()
    x = data(model, n=16)
    log_px = evidence(model, x)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.testing.assert_close(vae.elbo(x), log_px, rtol=0, atol=1e-7)
        # the best diagonal Gaussian (the true conditionals' variances) falls short for every x
        diagonal = LinearEncoder(
            model["gain"], model["b"], -0.5 * np.log(np.diag(np.linalg.inv(model["cov"])))
        )
        mean_field = VAE(D, LATENT, "gaussian", encoder=diagonal, decoder=GaussianDecoder(model)).double()
        expected_elbo = mean_field.log_weights(x, 4000)["log_w"].mean(0)
        assert bool((expected_elbo < log_px - 0.01).all())


def test_iwae_bound_increases_with_k_and_stays_below_log_evidence() -> None:
    model = linear_gaussian(seed=5, orthogonal=False)
    vae = exact_gaussian_vae(model)  # diagonal q for a correlated posterior, log_std too small
    with torch.no_grad():
        vae.encoder.log_std.sub_(0.4)
    x = data(model, n=32)
    log_px = evidence(model, x)
    repeats = 200
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        bounds = {
            k: torch.stack([vae.iwae_bound(x, k) for _ in range(repeats)]) - log_px for k in (1, 4, 16, 64)
        }
    means = {k: float(v.mean()) for k, v in bounds.items()}
    errors = {k: float(v.mean(1).std() / math.sqrt(repeats)) for k, v in bounds.items()}
    ks = sorted(means)
    for small, large in zip(ks[:-1], ks[1:]):  # each gap step is many standard errors wide
        assert means[large] - means[small] > 3 * (errors[large] + errors[small]), (means, errors)
    assert all(means[k] <= 2 * errors[k] for k in ks)
    assert means[1] < -0.05  # the approximation is visibly imperfect, so the ordering is informative


def flow_map(posterior: Posterior, context: torch.Tensor):
    def apply(z0: torch.Tensor) -> torch.Tensor:
        return posterior.flow.inverse_and_log_prob(z0.unsqueeze(0), context=context)[0][0]

    return apply


@pytest.mark.parametrize(
    ("family", "mode", "net"),
    [("planar", "concat", False), ("cnf", "concat", False), ("cnf", "film", False), ("cnf", "film", True)],
)
def test_amortised_flow_log_det_matches_autograd_and_its_inverse(family: str, mode: str, net: bool) -> None:
    torch.manual_seed(0)
    solver = Solver(rtol=1e-10, atol=1e-10)
    posterior = Posterior(3, 4, family, layers=5, hidden=(8,), solver=solver, context_mode=mode, context_net=net).double()
    with torch.no_grad():  # make the context matter
        for p in posterior.parameters():
            p.mul_(3.0)
    contexts = torch.randn(4, 4, dtype=torch.float64)
    z0 = torch.randn(4, 3, dtype=torch.float64)
    z, log_p = posterior.flow.inverse_and_log_prob(z0, context=contexts)
    log_det = standard_normal_log_prob(z0) - log_p
    for i in range(4):
        jac = torch.autograd.functional.jacobian(flow_map(posterior, contexts[i : i + 1]), z0[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-7)
    # the sampling path's log q(z | x) equals the scoring path's (the inverse: root finding / 1 -> 0 solve)
    mean, log_std = torch.randn(4, 3, dtype=torch.float64), 0.3 * torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(1)
    zs, log_q = posterior.sample_and_log_prob(mean, log_std, contexts, k=2)
    torch.testing.assert_close(posterior.log_prob(zs, mean, log_std, contexts), log_q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("family", POSTERIORS)
def test_gradients_reach_encoder_decoder_and_flow(family: str) -> None:
    if family == "iaf":
        pytest.importorskip("zuko")
    torch.manual_seed(0)
    vae = VAE(16, 2, family, hidden=(8,), flow_hidden=(8,), layers=2, solver=Solver(rtol=1e-4, atol=1e-4))
    x = torch.bernoulli(torch.full((6, 16), 0.4))
    vae.elbo(x, kl_weight=0.5).mean().neg().backward()
    for part in ("encoder", "decoder", "posterior"):
        params = list(getattr(vae, part).named_parameters())
        if part == "posterior" and family == "gaussian":
            assert not params
            continue
        missing = [n for n, p in params if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert params and not missing, (part, missing)


def test_binarized_digits_are_dynamic_for_training_and_fixed_for_test() -> None:
    first, second = load_binarized("digits"), load_binarized("digits", n_train=100)
    assert first.train.shape == (1438, 64) and first.val.shape == (179, 64) and first.shape == (8, 8)
    assert ((first.train > 0) & (first.train < 1)).any() and first.train.min() >= 0 and first.train.max() <= 1
    assert set(first.test.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first.test, second.test) and torch.equal(first.val, second.val)
    assert second.train.shape == (100, 64)
    with pytest.raises(ValueError, match="unknown binarised dataset 'mnist'"):
        load_binarized("mnist")


def test_elbo_training_checkpoints_resumes_and_stops_early(tmp_path) -> None:
    data = load_binarized("digits", n_train=200)
    torch.manual_seed(0)
    vae = VAE(64, 2, "planar", hidden=(16,), flow_hidden=(8,), layers=2)
    settings = TrainSettings(objective="elbo", iters=6, batch_size=32, val_every=3, kl_warmup=4, lr=1e-3)
    result = train(vae, data.train, data.val, settings=settings, out=tmp_path, progress=False)
    assert result.step == 6 and math.isfinite(result.val_nll)
    restored, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert isinstance(restored, VAE) and restored.posterior.family == "planar"
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    torch.testing.assert_close(restored.elbo(data.test, generator=g1), vae.elbo(data.test, generator=g2))
    more = train(restored, data.train, data.val, settings=settings, out=tmp_path, resume=tmp_path / "checkpoint.pt",
                 progress=False, iters=9)  # fmt: skip
    assert more.step == 9
    # early stopping: a learning rate of 0 never improves, so it stops after `patience` validations
    stop = train(vae, data.train, data.val, settings=settings, progress=False, iters=50, val_every=1, lr=1e-12,
                 patience=2)  # fmt: skip
    assert stop.stopped_by == "early_stopping" and stop.step < 50
    # with an EMA of the weights the averaged weights are validated, kept and returned
    ema_stop = train(vae, data.train, data.val, settings=settings, progress=False, iters=50, val_every=1, lr=1e-12,
                     patience=2, ema_decay=0.5)  # fmt: skip
    for run in (stop, ema_stop):  # the result reports the best validation, whose weights were kept
        assert run.stopped_by == "early_stopping"
        assert run.val_nll == min(r["val_nll"] for r in run.history if "val_nll" in r)


def test_kl_warmup_and_early_stopping_rules() -> None:
    assert [kl_warmup_weight(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0
    assert TrainSettings(objective="elbo", kl_warmup=10).loss_kwargs(4) == {"kl_weight": 0.5}
    assert TrainSettings().loss_kwargs(4) == {}
    model = nn.Linear(1, 1)
    stopper = EarlyStopping(2)
    assert [stopper.should_stop(v, model.state_dict(), s) for s, v in enumerate([3.0, 2.0, 2.5, 1.9, 2.0, 2.1])] == [
        False, False, False, False, False, True,
    ]  # fmt: skip
    assert stopper.best == 1.9 and stopper.best_step == 3


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="unknown posterior 'sylvester'"):
        VAE(4, 2, "sylvester")
    with pytest.raises(ValueError, match="posterior has latent_dim=3, the VAE latent_dim=2"):
        VAE(4, 2, Posterior(3, 4, "planar"))
    vae = VAE(4, 2, hidden=(4,))
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        vae.iwae_bound(torch.zeros(3, 4), 0)
    with pytest.raises(ValueError, match="x must"):
        vae.elbo(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\], got values in \[0.0, 2.0\]"):
        elbo_loss(vae, torch.tensor([[0.0, 2.0, 1.0, 0.5]]))
    with pytest.raises(ValueError, match="kl_warmup=5 applies only to objective='elbo'"):
        TrainSettings(kl_warmup=5)
    with pytest.raises(ValueError, match="patience must be a positive int"):
        TrainSettings(patience=0)
    with pytest.raises(TypeError, match="needs a model with elbo"):
        elbo_loss(nn.Linear(4, 4), torch.zeros(2, 4))


def test_cli_trains_and_evaluates_a_vae(tmp_path, capsys) -> None:
    from cnf.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "vae", "--posterior", "cnf", "--data", "digits", "--iters", "3", "--batch-size", "32",
            "--hidden", "16", "--flow-hidden", "8", "--latent-dim", "2", "--kl-warmup", "2", "--rtol", "1e-3",
            "--atol", "1e-3", "--iwae-samples", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    said = "training a VAE (cnf posterior, h(x) by FiLM through a context network, 2-D latent, encoder and decoder 16)"
    assert said + " on digits: elbo with" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["posterior"] == "cnf" and summary["steps"] == 3 and summary["test_k"] == 4
    assert summary["test_iwae"] < 0 and summary["test_elbo_two_se"] > 0
    resumed = ["train", "--resume", str(out / "checkpoint.pt"), "--iters", "5", "--iwae-samples", "4"]
    assert main(resumed) == 0
    assert "at step 3 with the run's own model, solver and settings; changed: --iters 5" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["posterior"] == "cnf" and summary["settings"]["kl_warmup"] == 2
    capsys.readouterr()
    assert main([*resumed, "--latent-dim", "4", "--rtol", "1e-3", "--hidden", "32"]) == 2  # the model is the run's
    err = capsys.readouterr().err
    assert "cannot change --latent-dim 4, --hidden 32 when resuming" in err and "latent_dim=2, hidden=[16]" in err
    assert main([*resumed, "--layers", "3"]) == 2
    assert "--layers 3 applies to --posterior planar or iaf, got --posterior cnf" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--data", "digits", "--n", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 20
    assert main(["train", "--model", "vae", "--data", "moons", "--out", str(tmp_path / "bad")]) == 2
    assert "--data must be one of ('digits', 'fashion-mnist'), got 'moons'" in capsys.readouterr().err

    # cnf plot draws images of a VAE (it used to pair pixel coordinates as for a 64-D table), and
    # with a 2-D latent also q(z|x) beside the true posterior
    plots = tmp_path / "plots"
    assert main(["plot", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(plots)]) == 0
    names = {"reconstructions.png", "samples.png", "training_curves.png", "posteriors.png"}
    assert {p.name for p in plots.iterdir()} == names
    from cnf.vae.plots import plot_vae

    data = load_binarized("digits", n_train=20)
    paths = plot_vae(VAE(64, 3, "gaussian", hidden=(8,)), data.test[:8], data.shape, tmp_path / "latent3")
    assert {p.name for p in paths} == {"reconstructions.png", "samples.png"}  # no grid beyond 2-D


def train_tiny_cnf_vae(out, *flags: str, iters: int = 2) -> VAE:
    """`cnf train --model vae --posterior cnf` on digits at a tiny size with extra ``flags``; the
    trained VAE loaded back from its checkpoint."""
    from cnf.cli import main

    args = ["train", "--model", "vae", "--posterior", "cnf", "--data", "digits", "--iters", str(iters),
            "--batch-size", "16", "--hidden", "8", "--flow-hidden", "8", "--latent-dim", "2", "--rtol", "1e-3",
            "--atol", "1e-3", "--iwae-samples", "2", "--out", str(out), *flags]  # fmt: skip
    assert main(args) == 0
    return load_checkpoint(out / "checkpoint.pt")[0]


def test_cli_flow_context_reaches_the_cnf_posterior(tmp_path, capsys) -> None:
    from cnf.cli import main

    vae = train_tiny_cnf_vae(tmp_path / "film", "--flow-context", "film", "--no-flow-context-net")
    assert vae.posterior.flow.field.context_mode == "film" and vae.posterior.flow.field.embedding is None
    # with no flag a 2-D latent takes the recipe (FiLM through a context network), a 3-D one the bias
    vae = train_tiny_cnf_vae(tmp_path / "recipe")
    assert vae.posterior.flow.field.context_mode == "film" and vae.posterior.flow.field.embedding is not None
    vae = train_tiny_cnf_vae(tmp_path / "recipe3", "--latent-dim", "3")
    assert vae.posterior.flow.field.context_mode == "concat" and vae.posterior.flow.field.embedding is None
    bad = ["train", "--model", "vae", "--posterior", "planar", "--flow-context", "film", "--data", "digits",
           "--out", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2
    assert "--flow-context film applies to --posterior cnf, got --posterior planar" in capsys.readouterr().err
    bad[5] = "--flow-context-net"
    del bad[6]
    assert main(bad) == 2
    assert "--flow-context-net applies to --posterior cnf, got --posterior planar" in capsys.readouterr().err


def test_film_cnf_posterior_round_trips_through_its_config() -> None:
    vae = VAE(16, 2, "cnf", hidden=(8,), flow_hidden=(8, 8), flow_context="film")
    assert vae.posterior.flow.field.context_mode == "film"
    rebuilt = VAE.from_config(vae.config())
    assert rebuilt.config() == vae.config() and rebuilt.posterior.flow.field.context_mode == "film"
    assert VAE.from_config({k: v for k, v in vae.config().items() if k != "flow_context"}).posterior.context_mode == "concat"
    with pytest.raises(ValueError, match="unknown flow_context 'bias'"):
        VAE(16, 2, "cnf", flow_context="bias")


def assert_round_trips(vae: VAE) -> None:
    """The VAE rebuilt from its config takes its weights and gives the same ELBO on the same draws."""
    rebuilt = VAE.from_config(vae.config())
    assert rebuilt.config() == vae.config()
    rebuilt.load_state_dict(vae.state_dict())
    x = torch.bernoulli(torch.full((3, vae.dim), 0.5))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        expected = vae.elbo(x)
        torch.manual_seed(0)
        torch.testing.assert_close(rebuilt.elbo(x), expected)


def test_cnf_posterior_context_follows_the_latent_size_recipe_and_round_trips() -> None:
    low, high = VAE(16, 2, "cnf", hidden=(12,), flow_hidden=(8, 8)), VAE(16, 3, "cnf", hidden=(12,), flow_hidden=(8, 8))
    assert (low.config()["flow_context"], low.config()["flow_context_net"]) == ("film", True)
    assert (high.config()["flow_context"], high.config()["flow_context_net"]) == ("concat", False)
    field = low.posterior.flow.field
    assert isinstance(field.embedding, torch.nn.Sequential) and field.embedding[0].in_features == 12  # h is 12-D
    # h(x) reaches the field only through the network: its 8 features, not h, feed the FiLM layers
    assert field.context_layers[0].in_features == 8 and high.posterior.flow.field.context_layers[0].in_features == 12
    assert_round_trips(low)  # the same parameters, network included
    # a checkpoint saved before the option has no network, whatever its latent size
    old = VAE.from_config({k: v for k, v in low.config().items() if k != "flow_context_net"})
    assert old.posterior.flow.field.embedding is None
    explicit = VAE(16, 2, "cnf", hidden=(8,), flow_hidden=(8,), flow_context="concat", flow_context_net=False)
    assert explicit.posterior.flow.field.embedding is None and explicit.posterior.context_mode == "concat"
    with pytest.raises(TypeError, match="context_net must be True or False, got 'yes'"):
        VAE(16, 2, "cnf", flow_context_net="yes")


def test_cnf_posterior_activation_is_tanh_and_old_checkpoints_keep_softplus(tmp_path, capsys) -> None:
    from cnf.cli import main

    vae = VAE(16, 2, "cnf", hidden=(8,), flow_hidden=(8,))
    assert vae.posterior.flow.field.activation_name == "tanh" and vae.config()["flow_activation"] == "tanh"
    assert_round_trips(vae)
    # a configuration saved before the option rebuilds the softplus field it was trained with
    old = VAE.from_config({k: v for k, v in vae.config().items() if k != "flow_activation"})
    assert old.posterior.flow.field.activation_name == "softplus"
    with pytest.raises(ValueError, match="unknown flow_activation 'sin'"):
        VAE(16, 2, "cnf", flow_activation="sin")
    trained = train_tiny_cnf_vae(tmp_path / "softplus", "--activation", "softplus", iters=1)
    assert trained.posterior.flow.field.activation_name == "softplus"
    bad = ["train", "--model", "vae", "--posterior", "gaussian", "--activation", "elu", "--data", "digits",
           "--out", str(tmp_path / "bad")]  # fmt: skip
    assert main(bad) == 2
    assert "--activation elu applies to --posterior cnf, got --posterior gaussian" in capsys.readouterr().err
    bad[4], bad[6] = "cnf", "sin"  # an unknown activation is refused under the flag's name
    with pytest.raises(SystemExit, match="2"):
        main(bad)
    assert "argument --activation: invalid choice: 'sin'" in capsys.readouterr().err


def test_cli_vae_scores_a_capped_number_of_test_images(tmp_path, capsys, monkeypatch) -> None:
    """k = 1000 on every Fashion-MNIST test image outlasts training: the summary scores at most
    TRAIN_TEST_IMAGES (or --test-n) and names the command that scores them all."""
    from cnf import cli_images

    monkeypatch.setattr(cli_images, "TRAIN_TEST_IMAGES", 7)  # digits has 180 test images
    train_tiny_cnf_vae(tmp_path / "capped", iters=1)
    assert json.loads((tmp_path / "capped" / "summary.json").read_text())["test_n"] == 7
    said = capsys.readouterr().out
    assert "scoring the first 7 of 180 test images (--test-n; `cnf evaluate --checkpoint" in said
    assert "--data digits --n 180` scores them all)" in said
    train_tiny_cnf_vae(tmp_path / "five", "--test-n", "5", iters=1)
    assert json.loads((tmp_path / "five" / "summary.json").read_text())["test_n"] == 5


def test_cli_vae_on_fashion_mnist_takes_the_vae_path(tmp_path, monkeypatch) -> None:
    """`fashion-mnist` also names an image dataset; with --model vae it must reach the VAE trainer."""
    from cnf import cli

    taken = []
    monkeypatch.setattr(cli, "cmd_train_vae", lambda args, resume: taken.append(args.data) or 0)
    monkeypatch.setattr(cli.cli_images, "cmd_train_images", lambda args: pytest.fail("took the image path"))
    assert cli.main(["train", "--model", "vae", "--data", "fashion-mnist", "--out", str(tmp_path / "v")]) == 0
    assert taken == ["fashion-mnist"]


def test_evaluate_vae_stops_after_its_time_limit(tmp_path, record_time_limits) -> None:
    """With a time limit no batch starts after it (here: after the first), the first n images are
    scored, and they score as they do alone; cnf train passes max(MIN_SCORE_SECONDS, training
    time) without --test-n, and no limit with it."""
    from cnf import cli_images
    from cnf.cli import main
    from cnf.vae import evaluate as vae_evaluate
    from cnf.vae.evaluate import evaluate_vae

    torch.manual_seed(0)
    vae = VAE(6, 2, "planar", hidden=(8,), layers=2)
    x = (torch.rand(25, 6) > 0.5).float()
    first = evaluate_vae(vae, x, k=3, batch_size=10, time_limit=0.0)
    alone = evaluate_vae(vae, x[:10], k=3, batch_size=10)
    assert first["n"] == 10 and first["iwae"] == pytest.approx(alone["iwae"])
    assert evaluate_vae(vae, x, k=3, batch_size=10)["n"] == 25

    limits = record_time_limits(vae_evaluate, "evaluate_vae")
    args = ["train", "--model", "vae", "--data", "digits", "--iters", "2", "--hidden", "8", "--latent-dim", "2",
            "--iwae-samples", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--test-n", "5", "--out", str(tmp_path / "b")]) == 0
    assert limits[0] >= cli_images.MIN_SCORE_SECONDS and limits[1] is None


def test_cli_vae_keeps_n_train_images_and_its_resume_too(tmp_path, monkeypatch) -> None:
    """--n-train N on a VAE run trains on the first N images (it used to be ignored), and a resumed
    run loads the same N."""
    import cnf.data.binarized as binarized
    from cnf.checkpoint import read_checkpoint
    from cnf.cli import main

    seen = []

    def spy(name, seed=0, n_train=None):
        seen.append(n_train)
        return load_binarized(name, seed=seed, n_train=n_train)

    monkeypatch.setattr(binarized, "load_binarized", spy)
    out = tmp_path / "vae"
    assert main(["train", "--model", "vae", "--data", "digits", "--n-train", "100", "--iters", "2",
                 "--iwae-samples", "2", "--test-n", "4", "--out", str(out)]) == 0  # fmt: skip
    assert read_checkpoint(out / "checkpoint.pt")["run"]["n_train"] == 100
    assert main(["train", "--resume", str(out), "--iters", "3", "--iwae-samples", "2", "--test-n", "4"]) == 0
    assert seen == [100, 100]


@pytest.mark.parametrize("context_mode", ["concat", "film"])
def test_cnf_posterior_init_scale_multiplies_the_initial_velocity(context_mode: str) -> None:
    """init_scale s starts the CNF posterior's field at s times the default-initialised velocity
    (same seed, same points, times and contexts), whatever the context mode; it must be positive."""
    fields = []
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        fields.append(Posterior(4, 6, "cnf", hidden=(8, 8), context_mode=context_mode, init_scale=scale).flow.field)
    z, t, h = torch.randn(5, 4), torch.rand(5, 1), torch.randn(5, 6)
    for time in (t, t[:1]):  # one time per row, and one time for the batch (the fused path)
        base, scaled = (f(time, z, context=h) for f in fields)
        torch.testing.assert_close(scaled, 3.0 * base)
        assert not torch.allclose(scaled, base)
    with pytest.raises(ValueError, match="init_scale must be a positive number, got 0"):
        Posterior(4, 6, "cnf", init_scale=0)


@pytest.mark.parametrize(
    ("data", "latent", "hidden", "kl_warmup", "val_every"),
    [("digits", 8, [128, 128], 300, 100), ("fashion-mnist", 16, [256, 256], 1000, 250)],
)
def test_cli_vae_defaults_are_the_benchmark_settings_of_the_data_set(
    data, latent, hidden, kl_warmup, val_every, tmp_path, monkeypatch
) -> None:
    """With no flags, `cnf train --model vae --posterior cnf` takes the settings of the README's
    benchmarks.vae command for that data set: latent size, widths, KL warm-up, validation
    cadence, patience 5 and the CNF posterior's tolerance 1e-4 (flags still override)."""
    import cnf.data.binarized as binarized
    from cnf.checkpoint import read_checkpoint
    from cnf.cli import main

    if data == "fashion-mnist":  # the same code path on digits' images: no Debian package needed
        monkeypatch.setattr(binarized, "load_binarized", lambda name, seed=0, n_train=None: load_binarized("digits", seed=seed, n_train=n_train))
    out = tmp_path / data
    assert main(["train", "--model", "vae", "--posterior", "cnf", "--data", data, "--iters", "1",
                 "--iwae-samples", "2", "--test-n", "2", "--out", str(out)]) == 0  # fmt: skip
    payload = read_checkpoint(out / "checkpoint.pt")
    run, settings = payload["run"], payload["settings"]
    assert (run["latent_dim"], run["hidden"]) == (latent, hidden)
    assert (settings["kl_warmup"], settings["val_every"], settings["patience"]) == (kl_warmup, val_every, 5)
    assert payload["config"]["solver"]["rtol"] == payload["config"]["solver"]["atol"] == 1e-4
    from benchmarks.vae import dataset_args, make_parser  # the benchmark with no flags: the same recipe

    bench = dataset_args(data, payload["config"]["dim"], make_parser().parse_args([]))
    assert (bench.latent_dim, list(bench.hidden), bench.tol) == (latent, hidden, 1e-4)
    names = ("lr", "batch_size", "kl_warmup", "val_every", "patience")
    assert {name: getattr(bench, name) for name in names} == {name: settings[name] for name in names}
    flagged = ["train", "--model", "vae", "--data", data, "--iters", "1", "--latent-dim", "3", "--kl-warmup", "7",
               "--iwae-samples", "2", "--test-n", "2", "--out", str(tmp_path / "flags")]  # fmt: skip
    assert main(flagged) == 0
    payload = read_checkpoint(tmp_path / "flags" / "checkpoint.pt")
    assert payload["run"]["latent_dim"] == 3 and payload["settings"]["kl_warmup"] == 7
    bench = dataset_args(data, 64, make_parser().parse_args(["--latent-dim", "3", "--kl-warmup", "7"]))
    assert (bench.latent_dim, bench.kl_warmup) == (3, 7)


def test_grid_posterior_and_kl_match_the_linear_gaussian_closed_form() -> None:
    """On the linear-Gaussian model (2-D latent) the grid quadrature gives log p(x) and the true
    posterior's log-density in closed form, and the Monte Carlo KL(q || p(z | x)) of a diagonal q
    (the exact posterior's marginal variances, shrunk) matches the Gaussian KL formula."""
    from cnf.vae.evaluate import grid_log_evidence, grid_posterior, kl_to_true_posterior

    model = linear_gaussian(seed=5, orthogonal=False)
    vae = exact_gaussian_vae(model)
    with torch.no_grad():
        vae.encoder.log_std.sub_(0.3)
    x = data(model, n=6)
    log_px = evidence(model, x)
    panels = grid_posterior(vae, x, bound=6.0, resolution=240)
    torch.testing.assert_close(panels["log_evidence"], log_px, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_log_evidence(vae, x, bound=6.0, resolution=240, chunk=4), log_px, rtol=0, atol=1e-6)
    means = (x.numpy() - model["b"]) @ model["gain"].T
    exact = [multivariate_normal(m, model["cov"]).logpdf(points) for m, points in zip(means, panels["points"].numpy())]
    torch.testing.assert_close(panels["log_true"], torch.as_tensor(np.stack(exact)), rtol=0, atol=1e-6)
    variances = np.exp(2 * vae.encoder.log_std.detach().numpy())
    precision = np.linalg.inv(model["cov"])
    # q and p share their mean, so the Gaussian KL has no mean term
    closed = 0.5 * (np.trace(precision @ np.diag(variances)) - LATENT + np.linalg.slogdet(model["cov"])[1]
                    - np.log(variances).sum())  # fmt: skip
    kl, two_se = kl_to_true_posterior(vae, x, panels["log_evidence"], samples=20000)
    assert closed > 0.1
    assert bool(((kl - closed).abs() < two_se + 1e-3).all()), (kl, two_se, closed)


def test_posterior_window_holds_posteriors_the_fixed_grid_misses() -> None:
    """Images whose posteriors lie outside [-4, 4]^2: the fixed grid's quadrature log p(x) is far
    off, the grid on each image's posterior_window matches the closed form, and q's mass is on it."""
    from cnf.vae.evaluate import grid_posterior, posterior_window

    model = linear_gaussian(seed=5, orthogonal=False)
    vae = exact_gaussian_vae(model)
    far = torch.tensor([[7.0, -6.0], [-9.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    x = far @ torch.as_tensor(model["W"]).T + torch.as_tensor(model["b"])
    log_px = evidence(model, x)
    fixed = grid_posterior(vae, x, bound=4.0, resolution=100)
    assert bool(((fixed["log_evidence"] - log_px)[:2] < -5).all())
    centre, half = posterior_window(vae, x)
    means = torch.as_tensor((x.numpy() - model["b"]) @ model["gain"].T)
    assert bool(((means - centre).abs().amax(1) < half).all()) and bool((half < 3).all())  # not a grid from the origin
    panels = grid_posterior(vae, x, resolution=100, window=(centre, half))
    torch.testing.assert_close(panels["log_evidence"], log_px, rtol=0, atol=1e-4)
    cell = (2 * half / 99) ** 2
    q_mass = panels["log_q"].exp().sum(1) * cell
    torch.testing.assert_close(q_mass, torch.ones_like(q_mass), rtol=0, atol=1e-3)


def test_inference_gaps_split_the_kl_into_the_familys_shortfall_and_the_encoders() -> None:
    """Cremer et al.'s split on the linear-Gaussian model (correlated 2-D posterior N(m, S)), each
    encoder off in its mean and scale: refining a diagonal Gaussian per image reaches the best
    mean-field KL, 0.5 (sum_i log (S^-1)_ii + log det S), the rest is amortisation; a CNF family
    that holds the exact posterior refines to KL 0."""
    from cnf.vae.evaluate import inference_gaps, refine_encoding

    model = linear_gaussian(seed=3, orthogonal=False)
    x = data(model, n=5)
    log_px = evidence(model, x)
    precision = np.linalg.inv(model["cov"])
    best_mean_field = 0.5 * (np.log(np.diag(precision)).sum() + np.linalg.slogdet(model["cov"])[1])
    assert best_mean_field > 0.05

    gaussian = exact_gaussian_vae(model)
    with torch.no_grad():
        gaussian.encoder.gain.mul_(0.7)
        gaussian.encoder.log_std.add_(0.4)
    gaps = inference_gaps(gaussian, x, log_px, samples=20000, steps=400)
    torch.testing.assert_close(gaps["approximation"], torch.full_like(log_px, best_mean_field), rtol=0, atol=0.01)
    assert bool((gaps["amortisation"] > 0.1).all())

    root = np.real(sqrtm(model["cov"]))
    encoder = LinearEncoder(0.7 * np.linalg.solve(root, model["gain"]), model["b"], np.full(LATENT, 0.4))
    flow = CNF(LinearContextField(np.real(logm(root))), solver=Solver(rtol=1e-6, atol=1e-6))
    vae = VAE(D, LATENT, Posterior(LATENT, D, flow=flow), encoder=encoder, decoder=GaussianDecoder(model)).double()
    gaps = inference_gaps(vae, x, log_px, samples=2000, steps=300, lr=0.1)
    assert bool((gaps["kl"] > 0.1).all())
    torch.testing.assert_close(gaps["approximation"], torch.zeros_like(log_px), rtol=0, atol=0.01)
    # the model is not touched (neither its weights nor their .grad), and bad arguments are named
    assert vae.encoder.log_std.detach().tolist() == [0.4, 0.4]
    assert all(parameter.grad is None for parameter in vae.parameters())
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        refine_encoding(vae, x, steps=0)
