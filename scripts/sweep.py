"""Sweep the latent search's settings on a trained run (same as `defuse-jax sweep`).

python scripts/sweep.py --out runs/digits --quick
"""

from __future__ import annotations

import argparse
import sys

from defuse_jax import sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=(sweep.__doc__ or "").splitlines()[0])
    sweep.add_arguments(parser)
    return sweep.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
