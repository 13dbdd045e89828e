"""JAX-native mixture models with scikit-learn's API: EM `GaussianMixture` and the variational
(Dirichlet-process) `BayesianGaussianMixture`.

The estimators wrap jittable functional fits (`fit_gaussian_mixture`,
`fit_bayesian_gaussian_mixture`): one compiled `lax.while_loop` over iterations, `vmap` over
`n_init` restarts, rows optionally sharded over devices with the sufficient statistics summed.
"""

from defuse_jax.mixture._base import IllDefinedCovarianceError
from defuse_jax.mixture.em import GaussianMixture, fit_gaussian_mixture
from defuse_jax.mixture.variational import BayesianGaussianMixture, fit_bayesian_gaussian_mixture

__all__ = [
    "BayesianGaussianMixture",
    "GaussianMixture",
    "IllDefinedCovarianceError",
    "fit_bayesian_gaussian_mixture",
    "fit_gaussian_mixture",
]
