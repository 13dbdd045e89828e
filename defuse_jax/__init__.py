"""defuse-jax: Defuse (Slack et al. 2021) in JAX/Flax, built for accelerator throughput."""

__version__ = "0.1.0"
