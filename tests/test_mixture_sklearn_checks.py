"""scikit-learn's own estimator suite (`check_estimator`) on both mixture estimators: every
check passes. None is skipped through the estimators' tags; scikit-learn itself skips its
array-API check unless SCIPY_ARRAY_API=1 is set."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture


# max_iter=20 keeps each of the suite's many small fits short; the checks do not need convergence
@parametrize_with_checks([GaussianMixture(max_iter=20), BayesianGaussianMixture(max_iter=20)])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
