"""Identification: compiled, batched, sharded latent search for unrestricted adversarial examples.

Example:
  >>> from defuse_jax.search import SearchConfig, latent_search
  >>> res = latent_search(decode_fn, classify_fn, z0, y0, key=jax.random.key(0),
  ...                     config=SearchConfig(mode="sample", num_samples=100))
  >>> print(res.summary())
  >>> per_scale = latent_search_sweep(decode_fn, classify_fn, z0, y0, key=jax.random.key(0),
  ...                                 config=SearchConfig(), scales=[0.25, 0.5, 1.0])
"""

from defuse_jax.search.api import PendingSearch, latent_search, lower_search, start_search
from defuse_jax.search.config import SearchConfig
from defuse_jax.search.result import SearchResult
from defuse_jax.search.scale_sweep import latent_search_sweep

__all__ = [
    "PendingSearch",
    "SearchConfig",
    "SearchResult",
    "latent_search",
    "latent_search_sweep",
    "lower_search",
    "start_search",
]
