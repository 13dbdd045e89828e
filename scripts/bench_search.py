"""Thin entry point: same as `defuse-jax bench search` (see defuse_jax/bench/search_bench.py)."""

import argparse

from defuse_jax.bench import search_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    search_bench.add_arguments(parser)
    search_bench.run(parser.parse_args())


if __name__ == "__main__":
    main()
