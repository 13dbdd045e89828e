"""Benchmarks behind `defuse-jax bench <name>`.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> dict`; `defuse_jax.cli`
registers them under `bench`. Results are printed as a table and written as JSON.
"""

BENCHMARKS = {
    # name -> module path (imported lazily so `defuse-jax --help` stays fast)
    "search": "defuse_jax.bench.search_bench",
    "mixture": "defuse_jax.bench.mixture_bench",
    "train": "defuse_jax.bench.train_bench",
}
