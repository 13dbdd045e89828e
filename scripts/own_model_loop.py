"""Per-step time of `fit` on a user's model (examples/my_classifier.py's linen CNN) with each
loop form: why `training.default_loop` dispatches a user's model step by step on a CPU.

    python scripts/own_model_loop.py [--steps 40] [--size 28]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def main() -> None:
    import jax
    import my_classifier

    from defuse_jax import losses, own_model
    from defuse_jax.training import TrainConfig, default_loop, fit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    module, variables = my_classifier.make()
    clf = own_model.as_classifier((module, variables), preprocess=my_classifier.normalize)
    rng = np.random.default_rng(0)
    n = args.batch_size * args.steps
    data = {
        "x": rng.random((n, args.size, args.size, 1), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }
    config = TrainConfig(epochs=1, batch_size=args.batch_size, checkpoint_every=10**6)
    print(f"backend {jax.default_backend()}, default loop for this model: {default_loop(clf)}")
    for loop in ("steps", "scan") * 2:  # the second round: compiled, warm
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            fit(clf, losses.classifier_loss, data, config=config, checkpoint_dir=tmp,
                fingerprint={}, progress=False, loop=loop)  # fmt: skip
            ms = (time.perf_counter() - t0) / args.steps * 1000
        print(f"{loop:>5}: {ms:.0f} ms/step over {args.steps} steps (a whole fit call)")


if __name__ == "__main__":
    main()
