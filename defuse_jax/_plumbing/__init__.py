"""Plumbing that both compiled engines (`defuse_jax.search`, `defuse_jax.mixture`) share.

Private. It imports neither engine, nor the models or the pipeline, so that both engines can
import it while neither imports the other:

- `threefry`: counter-based random words and their mapping to uniforms.
- `keys`: turning a JAX PRNG key into the raw threefry key the counters are hashed with.
- `row_layout`: padding rows to devices x blocks x rows per block.
"""
