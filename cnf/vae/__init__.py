"""Variational autoencoders with flow posteriors (the first seed lecture's question: beyond the
mean-field q(z | x)).

* :mod:`cnf.vae.posteriors`: q(z | x) = a diagonal Gaussian pushed through a flow conditioned on
  the encoder's context h(x): ``gaussian``, ``planar``, ``cnf`` (FFJORD's VAE), ``iaf`` (zuko).
* :mod:`cnf.vae.model`: the VAE (MLP encoder, Bernoulli decoder), ``elbo`` and ``iwae_bound``.
* Binarised image data: :mod:`cnf.data.binarized`; the training objective ``elbo`` (with KL
  warm-up) in :mod:`cnf.losses`.
"""

from cnf.vae.model import VAE, BernoulliDecoder, MLPEncoder
from cnf.vae.posteriors import POSTERIORS, Posterior, ZukoIAF

__all__ = ["POSTERIORS", "VAE", "BernoulliDecoder", "MLPEncoder", "Posterior", "ZukoIAF"]
