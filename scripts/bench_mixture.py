"""Thin entry point: `python scripts/bench_mixture.py [flags]` = `defuse-jax bench mixture`."""

import argparse

from defuse_jax.bench import mixture_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=(mixture_bench.__doc__ or "").splitlines()[0])
    mixture_bench.add_arguments(parser)
    mixture_bench.run(parser.parse_args())


if __name__ == "__main__":
    main()
