"""One process of a 2-process CPU "cluster" (tests/test_multihost.py starts two of these).

Usage: python multihost_worker.py PORT PROCESS_ID OUT_NPZ
Each process has 2 CPU devices (XLA_FLAGS set by the test), so the search runs on 4 devices over
2 processes, exactly as on several hosts after `jax.distributed.initialize()`.
"""

import os
import sys

import jax
import numpy as np

FIELDS = (
    "source_index",
    "pred_label",
    "flips_per_source",
    "used",
    "z",
    "prob",
    "perturbation_norm",
)


def main(port: str, process_id: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    # Imported only now: test_search builds its toy weights with JAX at import time.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_search import IDS, MODES, _sources, classify, decode

    from defuse_jax.search import latent_search

    z0, y0 = _sources()
    arrays = {}
    for name, config in zip(IDS, MODES, strict=True):
        res = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=config)
        for f in FIELDS:
            arrays[f"{name}.{f}"] = np.asarray(getattr(res, f))
    np.savez(out, **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
