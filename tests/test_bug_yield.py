"""The evaluation-only judge of the search's error codes (defuse_jax.bug_yield)."""

import dataclasses
import os

import numpy as np
import pytest

from defuse_jax import bug_yield, evaluation


def _images(labels, rng):
    """4x4 images whose class is where the bright quadrant is (easy for any judge)."""
    x = rng.uniform(0.0, 0.2, size=(len(labels), 4, 4, 1)).astype(np.float32)
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        x[i, 2 * r : 2 * r + 2, 2 * col : 2 * col + 2, 0] += 0.8
    return x


@pytest.fixture(scope="module")
def judge():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    return bug_yield.fit_judge(_images(y, rng), y, _images(y[:50], rng), y[:50])


def test_judge_is_named_and_measured(judge):
    assert judge.test_accuracy == 1.0
    assert "200 training images" in judge.name


@pytest.mark.parametrize(
    "shows, source, pred, region, bug, change, per_region",
    [
        # images showing the source class are bugs; those showing the prediction, class changes
        ([0, 1, 2, 3], [0, 1, 0, 0], [1, 2, 2, 3], [0, 0, 1, -1], 0.5, 0.5, {0: 1.0, 1: 0.0}),
        ([2, 2, 2], [0, 1, 3], [1, 0, 0], None, 0.0, 0.0, {}),
    ],
)
def test_shares_are_the_judges_readings(
    judge, shows, source, pred, region, bug, change, per_region
):  # noqa: E501
    images = _images(shows, np.random.default_rng(1))
    region = None if region is None else np.asarray(region)
    out = bug_yield.bug_yield(judge, images, np.asarray(source), np.asarray(pred), region=region)
    assert (out["bug"], out["class_change"], out["per_region"]) == (bug, change, per_region)
    assert out["codes_judged"] == len(shows) and out["judge"] == judge.name


def test_nothing_to_judge(judge):
    out = bug_yield.bug_yield(judge, np.zeros((0, 4, 4, 1)), np.zeros(0), np.zeros(0))
    assert out["bug"] is None and out["codes_judged"] == 0


@pytest.mark.parametrize(
    "shows, labels, pred, errors, read_true",
    [
        # two errors (images 1 and 2); the judge reads image 1 as its label, image 2 as the pred
        ([0, 1, 3, 2], [0, 1, 2, 2], [0, 3, 3, 2], 2, 0.5),
        ([0, 1], [0, 1], [0, 1], 0, None),  # no test error: nothing to read
    ],
)
def test_the_scale_is_the_judges_reading_of_the_classifiers_test_errors(
    judge, shows, labels, pred, errors, read_true
):
    images = _images(shows, np.random.default_rng(2))
    out = bug_yield.test_error_yield(judge, images, np.asarray(labels), np.asarray(pred))
    assert out == {"test_errors": errors, "test_error_yield": read_true}


def test_the_second_opinion_is_the_share_of_each_regions_samples_read_as_its_label(judge):
    rng = np.random.default_rng(3)
    # region 4 (label 1): samples show 1, 1, 2, 1; region 7 (label 3): 0, 0, 0, 3
    shows = np.asarray([[1, 1, 2, 1], [0, 0, 0, 3]])
    images = _images(shows.reshape(-1), rng).reshape(2, 4, 4, 4, 1)
    data = evaluation.EvalSet(
        x_test=images[0], y_test=np.asarray([1, 1, 2, 1]), region_ids=np.asarray([4, 7]),
        region_labels=np.asarray([1, 3]), region_images=images,
        error_labels=np.zeros(0, np.int64), error_images=images[0, :0],
    )  # fmt: skip
    assert bug_yield.label_agreement(judge, data) == {4: 0.75, 7: 0.25}
    none = data._replace(region_ids=np.zeros(0), region_labels=np.zeros(0),
                         region_images=images[:0])  # fmt: skip
    assert bug_yield.label_agreement(judge, none) == {}


def test_large_runs_judge_a_seeded_subset():
    a = bug_yield.judged_codes(50_000, most=1000, seed=3)
    assert len(a) == 1000 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, bug_yield.judged_codes(50_000, most=1000, seed=3))
    np.testing.assert_array_equal(bug_yield.judged_codes(7, most=1000, seed=3), np.arange(7))


def _dataset(size, n, rng):
    """A Dataset of `size`x`size` bright-quadrant images (4 classes)."""
    from defuse_jax.data import Dataset

    def images(labels):
        small = _images(labels, rng)  # 4x4, upsampled
        return np.kron(small, np.ones((1, size // 4, size // 4, 1), np.float32))

    y_train, y_test = (
        rng.integers(0, 4, n).astype(np.int32),
        rng.integers(0, 4, 40).astype(np.int32),
    )
    return Dataset(
        name="quadrants", x_train=images(y_train), y_train=y_train, x_test=images(y_test),
        y_test=y_test, num_classes=4, image_shape=(size, size, 1),
        class_names=("a", "b", "c", "d"), x_val=images(y_test[:0]), y_val=y_test[:0],
    )  # fmt: skip


@pytest.mark.parametrize("size, kinds", [(8, ["SVC"]), (20, ["SVC", "conv classifier"])])
def test_small_images_get_the_svc_and_larger_ones_also_a_conv_judge_trained_once(
    size, kinds, tmp_path, monkeypatch
):
    from defuse_jax import training_lengths
    from defuse_jax.training import TrainConfig

    ds = _dataset(size, 96, np.random.default_rng(0))
    short = TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3)
    found = bug_yield.judge_candidates(ds, cache_dir=str(tmp_path), seed=1, train=short)
    assert [j.name.startswith(k) for j, k in zip(found, kinds, strict=True)] == [True] * len(kinds)
    for judge in found:
        assert judge.test_accuracy >= 0.9
        np.testing.assert_array_equal(judge.predict(ds.x_test[:8]), ds.y_test[:8])
    trained = sorted(os.listdir(tmp_path))
    assert len(trained) == len(kinds) - 1
    if trained:  # the same data and seed reload it; other data train another
        again = bug_yield.train_judge(ds, cache_dir=str(tmp_path), seed=1, train=short)
        assert again.name == found[1].name and again.test_accuracy == found[1].test_accuracy
        assert sorted(os.listdir(tmp_path)) == trained
        # Epochs left to the step budget (as config.json saves them), resolving to the same 4
        # (3 steps per epoch), are the same judge.
        budget = training_lengths.StepBudget(steps=12, min_epochs=1)
        monkeypatch.setattr(training_lengths, "CLASSIFIER_BUDGET", budget)
        unset = dataclasses.replace(short, epochs=None)
        bug_yield.train_judge(ds, cache_dir=str(tmp_path), seed=1, train=unset)
        assert sorted(os.listdir(tmp_path)) == trained
        other = _dataset(size, 96, np.random.default_rng(1))
        bug_yield.train_judge(other, cache_dir=str(tmp_path), seed=1, train=short)
        assert len(os.listdir(tmp_path)) == 2


def _reader(images, labels, misreads):
    """A judge that reads `images[i]` as `misreads[i]` where given, else as `labels[i]`."""

    def predict(x):
        which = [int(np.flatnonzero((images == xi).all(axis=(1, 2, 3)))[0]) for xi in x]
        return np.asarray([misreads.get(i, labels[i]) for i in which])

    return predict


@pytest.mark.parametrize(
    "wrong_a, wrong_b, pred, chosen, balanced_a",
    [
        # a misreads the classifier's two errors (images 0, 1) as it does; b misreads one
        # image it gets right: b reads both halves better on balance
        ({0: 3, 1: 0}, {2: 3}, [3, 0, 2, 3, 0, 1], 1, (1.0 + 0.0) / 2),
        # a misreads one of the errors, b three of the four right ones: 3/4 against 5/8
        ({0: 3}, {2: 3, 3: 0, 4: 1}, [3, 0, 2, 3, 0, 1], 0, (1.0 + 0.5) / 2),
        # equal scores: the first candidate
        ({2: 3}, {3: 0}, [3, 0, 2, 3, 0, 1], 0, (0.75 + 1.0) / 2),
        # no error: the share on the images the classifier gets right alone
        ({2: 3}, {}, [0, 1, 2, 3, 0, 1], 1, 5 / 6),
    ],
)
def test_the_judge_chosen_reads_the_classifiers_right_images_and_its_errors_best(
    wrong_a, wrong_b, pred, chosen, balanced_a
):
    labels = np.asarray([0, 1, 2, 3, 0, 1])
    images = _images(labels, np.random.default_rng(4))
    a = bug_yield.Judge(_reader(images, labels, wrong_a), "a", 1.0)
    b = bug_yield.Judge(_reader(images, labels, wrong_b), "b", 1.0)
    choice = bug_yield.choose_judge([a, b], images, labels, np.asarray(pred))
    assert choice.chosen == chosen and choice.judge is (a, b)[chosen]
    assert choice.scores[0]["balanced"] == pytest.approx(balanced_a)
    assert [s["judge"] for s in choice.scores] == ["a", "b"]
    # Each candidate's bug yield on codes, the chosen one marked.
    codes = bug_yield.JudgedCodes(images, labels, np.asarray(pred), None)
    found, table = bug_yield.every_judge(choice, codes)
    assert [t["chosen"] for t in table] == [i == chosen for i in range(2)]
    for t, judge in zip(table, (a, b), strict=True):
        assert t["bug"] == bug_yield.bug_yield(judge, images, labels, np.asarray(pred))["bug"]
    assert found == bug_yield.bug_yield(choice.judge, images, labels, np.asarray(pred))
    with pytest.raises(ValueError, match="at least one candidate"):
        bug_yield.choose_judge([], images, labels, np.asarray(pred))
