"""Choosing the correction's lambda and epoch on validation data (`correction_selection`)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from defuse_jax import correction_selection as sel
from defuse_jax import models
from defuse_jax.correction import CorrectConfig, fine_tune
from defuse_jax.files import read_json
from defuse_jax.regions import Regions

_ORIGINAL = sel.Score(0.0, 0, 0.90, 0.30, 0.0)
_BOUNDS = {"max_val_drop": 0.01, "max_region_drop": 0.05, "region_tolerance": 0.01}


def _s(lam, epoch, val, region, drop=0.0, churn=0):
    return sel.Score(lam, epoch, val, region, drop, churn)


@pytest.mark.parametrize(
    "candidates, kept",
    [
        # The best watched-region accuracy within the bounds...
        ([_s(0.01, 3, 0.90, 0.95), _s(0.01, 4, 0.90, 0.99)], 1),
        # ... not one that loses too much validation accuracy, or too much on another region.
        ([_s(0.01, 3, 0.90, 0.95), _s(0.01, 4, 0.88, 1.00)], 0),
        ([_s(0.01, 3, 0.90, 0.95), _s(0.01, 4, 0.95, 1.00, drop=0.10)], 0),
        # Within the tolerance of the best, the one that breaks the fewest shifted training
        # images wins; among equals, the smallest lambda, then the earliest epoch.
        ([_s(0.01, 2, 0.92, 1.00), _s(0.001, 9, 0.90, 0.992), _s(0.001, 12, 0.90, 1.0)], 1),
        ([_s(0.001, 5, 0.90, 0.985), _s(0.001, 7, 0.90, 0.995), _s(0.003, 2, 0.90, 1.00)], 1),
        ([_s(0.001, 9, 0.90, 0.992, churn=40), _s(0.01, 2, 0.90, 1.0, churn=25)], 1),
        ([_s(0.001, 9, 0.90, 0.992, churn=25), _s(0.01, 2, 0.90, 1.0, churn=25)], 0),
        # ... but not one outside the tolerance, however little it breaks.
        ([_s(0.001, 9, 0.90, 0.97, churn=0), _s(0.01, 2, 0.90, 1.0, churn=25)], 1),
        # Nothing within the bounds, or nothing better than the original: the original is kept.
        ([_s(0.01, 3, 0.85, 1.00), _s(0.01, 4, 0.95, 1.00, drop=0.2)], None),
        ([_s(0.01, 3, 0.90, 0.305)], None),
    ],
)
def test_choose_keeps_the_least_churn_of_the_best_within_bounds(candidates, kept):
    chosen, given_up = sel.choose(_ORIGINAL, candidates, **_BOUNDS)
    assert chosen == (_ORIGINAL if kept is None else candidates[kept]) and given_up == ()


# Four labeled regions; regions 0 and 1 are watched (errors before), 2 and 3 are not.
_BEFORE = sel.Score(0.0, 0, 0.90, 0.15, 0.0, 0, (0.1, 0.2, 1.0, 1.0))
_WATCHED = (True, True, False, False)


def _r(epoch, per_region, val=0.90, churn=0):
    """A candidate scored per region (watched accuracy and worst drop derived from them)."""
    after = np.asarray(per_region)
    drop = float(max(0.0, (np.asarray(_BEFORE.per_region) - after).max()))
    return sel.Score(0.01, epoch, val, float(after[:2].mean()), drop, churn, tuple(per_region))


@pytest.mark.parametrize(
    "candidates, most, kept, given_up",
    [
        # Every fixing epoch breaks an unwatched region: with nothing to give up, the original.
        ([_r(1, (0.9, 0.9, 0.5, 1.0)), _r(2, (0.9, 0.9, 1.0, 0.4))], 0, None, ()),
        # Allowed one, the epoch that breaks one region and fixes the rest is kept, and the
        # region is named; of two such epochs, the better fix (then least churn) wins.
        ([_r(1, (0.9, 0.9, 0.5, 1.0)), _r(2, (0.95, 0.95, 1.0, 0.4))], 1, 2, (3,)),
        ([_r(1, (0.9, 0.9, 0.5, 1.0), churn=3), _r(2, (0.9, 0.9, 1.0, 0.4))], 1, 2, (3,)),
        # Fewer broken regions first, whatever the fix.
        ([_r(1, (1.0, 1.0, 0.5, 0.5)), _r(2, (0.6, 0.6, 1.0, 0.4))], 2, 2, (3,)),
        # More broken regions than allowed, a validation loss, or no real fix on the rest: the
        # original, as before.
        ([_r(1, (0.9, 0.9, 0.5, 0.5))], 1, None, ()),
        ([_r(1, (0.9, 0.9, 1.0, 0.5), val=0.80)], 1, None, ()),
        ([_r(1, (0.1, 0.9, 1.0, 0.5))], 1, 1, (3,)),
        ([_r(1, (0.1, 0.2, 1.0, 0.5))], 1, None, ()),
        # An epoch within the bounds is kept as before: nothing is given up.
        ([_r(1, (0.9, 0.9, 1.0, 0.5)), _r(2, (0.5, 0.5, 1.0, 1.0))], 1, 2, ()),
    ],
)
def test_regions_that_cannot_be_held_are_given_up_not_the_whole_correction(
    candidates, most, kept, given_up
):
    chosen, out = sel.choose(_BEFORE, candidates, **_BOUNDS, watched=_WATCHED, max_given_up=most)
    assert chosen == (_BEFORE if kept is None else candidates[kept - 1])  # kept: 1-based
    assert out == given_up


def test_shifted_images_move_every_image_one_step_each_way():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1) + 1
    out = sel.shifted_images(x).reshape(4, 2, 8, 8, 1)  # down, up, right, left; 1 px at 8x8
    np.testing.assert_array_equal(out[0, :, 1:], x[:, :-1])
    np.testing.assert_array_equal(out[1, :, :-1], x[:, 1:])
    np.testing.assert_array_equal(out[2, :, :, 1:], x[:, :, :-1])
    np.testing.assert_array_equal(out[3, :, :, :-1], x[:, :, 1:])
    assert (out[0, :, 0] == 0).all() and (out[3, :, :, -1] == 0).all()  # background comes in
    assert sel.shifted_images(np.zeros((1, 28, 28, 1))).shape == (4, 28, 28, 1)
    wide = sel.shifted_images(np.ones((1, 28, 28, 1)))
    assert (wide[0, :2] == 0).all() and (wide[0, 2:] == 1).all()  # 2 px at 28x28


def _tiny_models():
    vae = models.params_of(
        models.VAE(
            models.VAEConfig(latent_dim=2, hidden=16), image_shape=(8, 8, 1), rngs=nnx.Rngs(0)
        )  # fmt: skip
    )
    clf = models.params_of(
        models.Classifier(
            models.ClassifierConfig(hidden=16),
            image_shape=(8, 8, 1),
            num_classes=3,
            rngs=nnx.Rngs(1),
        )  # fmt: skip
    )
    return vae, clf


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    vae, clf = _tiny_models()
    means = np.asarray([[2.0, 0.0], [-2.0, 1.0]], np.float32)
    cov = np.broadcast_to(np.eye(2, dtype=np.float32), (2, 2, 2)).copy()
    regions = Regions(means, cov, np.full(2, 0.5, np.float32), np.zeros(0, np.int32),
                      [{"id": 0}, {"id": 1}])  # fmt: skip
    x = rng.uniform(size=(96, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, size=96).astype(np.int32)
    return vae, clf, regions, x, y


def test_fine_tune_keeps_the_chosen_epoch(tmp_path):
    vae, clf, regions, x, y = _problem()
    config = CorrectConfig(lams=(0.1, 1.0), epochs=3, batch_size=32, select_samples=16,
                           max_val_drop=1.0, max_region_drop=1.0)  # fmt: skip
    out = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                    x_val=x[64:], y_val=y[64:], config=config, out_dir=str(tmp_path),
                    min_error_rate=0.5, progress=False)  # fmt: skip
    selection = read_json(tmp_path / "selection.json")
    assert out.selection == selection and sorted(selection["per_lam"]) == ["0.1", "1"]
    held_out = sel.selection_data(clf, vae, regions, {0: 1, 1: 2}, x_val=x[64:], y_val=y[64:],
                                  x_train=x[:64], y_train=y[:64], samples=16, tau=config.tau,
                                  seed=config.seed, min_error_rate=0.5)  # fmt: skip
    original = sel.score(clf, held_out, lam=0.0, epoch=0)
    assert selection["original"] == sel.score_as_dict(original)
    # Every epoch of every lambda was scored, and the kept one is `choose`'s pick of them...
    candidates = [sel.score_from_dict(c) for rows in selection["per_lam"].values() for c in rows]
    assert len(candidates) == 2 * 3
    chosen = sel.score_from_dict(selection["chosen"])
    assert chosen.epoch > 0
    assert (chosen, ()) == sel.choose(original, candidates, max_val_drop=1.0, max_region_drop=1.0,
                                      region_tolerance=config.region_tolerance)  # fmt: skip
    # ... and training it again gave back that model: it scores exactly the same, returned and
    # saved where the report loads it from.
    assert sel.score(out.params, held_out, lam=chosen.lam, epoch=chosen.epoch) == chosen
    from defuse_jax.train_models import load_trained

    saved, _ = load_trained(str(tmp_path))
    assert sel.score(saved, held_out, lam=chosen.lam, epoch=chosen.epoch) == chosen
    assert len(out.history) == chosen.epoch
    assert not (tmp_path / "retrain").exists()  # its weights were held while its run trained


def test_a_new_choice_reuses_every_region_weights_finished_run(tmp_path, monkeypatch):
    """Settings of the choice alone (bounds, which lambdas, fewer epochs) retrain no region
    weight: the choice is made again from the runs in `runs_dir`, and equals a fresh one."""
    vae, clf, regions, x, y = _problem()
    scored, score_epoch = [], sel.EpochScores.__call__

    def counted(self, params, record):
        scored.append(int(record["epoch"]))
        score_epoch(self, params, record)

    monkeypatch.setattr(sel.EpochScores, "__call__", counted)
    base = CorrectConfig(lams=(0.1, 1.0), epochs=3, batch_size=32, select_samples=16,
                         max_val_drop=1.0, max_region_drop=1.0, control=False)  # fmt: skip

    outs = {}

    def run(config, name, runs_dir):
        scored.clear()
        outs[name] = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                               x_val=x[64:], y_val=y[64:], config=config,
                               out_dir=str(tmp_path / name), runs_dir=runs_dir,
                               progress=False)  # fmt: skip
        return outs[name].selection, list(scored)

    runs = str(tmp_path / "runs")
    first, n_first = run(base, "first", runs)
    assert len(n_first) == 2 * 3  # both weights, each epoch once; the kept one's weights held
    # With the runs reused, the kept model is trained again, to the same weights bit for bit.
    same, n_same = run(base, "same", runs)
    assert same == first and n_same == [] and (tmp_path / "same" / "retrain").is_dir()
    for a, b in zip(
        *(jax.tree.leaves(outs[k].params.state) for k in ("first", "same")), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    again = dataclasses.replace(base, lams=(1.0,), epochs=2, region_tolerance=0.5)
    second, n_second = run(again, "second", runs)
    assert n_second == []  # nothing trained but the kept model, whose scores are the run's
    assert second["per_lam"]["1"] == first["per_lam"]["1"][:2]
    fresh, _ = run(again, "fresh", str(tmp_path / "fresh_runs"))
    assert fresh == second
    # A setting the runs depend on (here the spread of the region samples) trains anew.
    other = dataclasses.replace(again, tau=0.02)
    _, n_other = run(other, "other", runs)
    assert len(n_other) >= 2
    assert len(os.listdir(runs)) == 3


def _score(lam, epoch, region, broken, val=1.0, drop=0.0):
    return sel.Score(lam, epoch, val, region, drop, broken)


def test_kept_weights_hold_every_epoch_the_choice_may_keep_and_no_other():
    """Whatever the bounds' survivors turn out to be, `choose`'s pick among all candidates is
    one whose weights were held; candidates out of bounds or beaten on both counts are not."""
    original = _score(0.0, 0, 0.2, 0)
    keep = sel.KeptWeights(original, max_val_drop=0.01, max_region_drop=0.05)
    candidates = [
        _score(0.1, 1, 0.90, 5), _score(0.1, 2, 0.95, 9), _score(0.1, 3, 0.96, 2),
        _score(0.1, 4, 0.99, 3, val=0.5),  # out of bounds: validation
        _score(1.0, 1, 0.94, 1), _score(1.0, 2, 0.97, 4), _score(1.0, 3, 0.97, 4, drop=0.2),
    ]  # fmt: skip
    for i, c in enumerate(candidates):
        keep.offer(c, models.Params(None, {"w": np.full(2, i)}))
    # (0.1, 1) and (0.1, 2) are beaten by (0.1, 3) on accuracy and churn; (1.0, 2) is not.
    assert set(keep.front) == {candidates[2], candidates[4], candidates[5]}
    for tolerance in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0):
        chosen, _ = sel.choose(original, candidates, max_val_drop=0.01, max_region_drop=0.05,
                               region_tolerance=tolerance)  # fmt: skip
        if chosen == original:  # the classifier itself: no weights to hold
            assert tolerance >= 0.97 - 0.2
            continue
        held = keep.params_of(chosen)
        assert held is not None, (tolerance, chosen)
        np.testing.assert_array_equal(held.state["w"], candidates.index(chosen))


def test_fine_tune_keeps_the_original_when_every_epoch_costs_too_much(tmp_path):
    vae, clf, regions, x, y = _problem(1)
    # Validation labels the original gets all right; a wild learning rate changes them.
    y_val = np.asarray(models.logits(clf, x[64:]).argmax(-1), np.int32)
    config = CorrectConfig(lams=(1.0,), epochs=2, batch_size=32, select_samples=8,
                           max_val_drop=0.0, learning_rate=1.0)  # fmt: skip
    out = fine_tune(clf, vae, regions, {0: 1, 1: 2}, x_train=x[:64], y_train=y[:64],
                    x_val=x[64:], y_val=y_val, config=config, out_dir=str(tmp_path),
                    progress=False)  # fmt: skip
    assert out.selection["kept_original"] and out.history == [] and out.control is None
    assert out.selection["original"]["val_accuracy"] == 1.0
    assert all(r["val_accuracy"] < 1.0 for r in out.selection["per_lam"]["1"])
    assert out.params is clf


def test_the_control_is_the_same_fine_tuning_blind_to_the_regions(tmp_path):
    """The control trains the kept number of epochs without region samples: relabeling the
    regions changes the corrected model but not the control, which is saved beside it."""
    from defuse_jax.train_models import load_trained

    vae, clf, regions, x, y = _problem()
    config = CorrectConfig(select=False, lam=1.0, epochs=2, batch_size=32)

    def run(labels, out_dir, cfg=config):
        return fine_tune(clf, vae, regions, labels, x_train=x, y_train=y, config=cfg,
                         out_dir=str(out_dir), progress=False)  # fmt: skip

    def weights(params):
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(params.state)])

    a, b = run({0: 1, 1: 2}, tmp_path / "a"), run({0: 2, 1: 0}, tmp_path / "b")
    assert not np.array_equal(weights(a.params), weights(b.params))
    np.testing.assert_array_equal(weights(a.control), weights(b.control))
    assert not np.array_equal(weights(a.control), weights(clf))  # it did train
    saved, _ = load_trained(str(tmp_path / "a" / "control"))
    np.testing.assert_array_equal(weights(saved), weights(a.control))
    off = run({0: 1, 1: 2}, tmp_path / "off", dataclasses.replace(config, control=False))
    assert off.control is None and not (tmp_path / "off" / "control").exists()


def test_choosing_without_a_validation_split_is_a_clear_error(tmp_path):
    vae, clf, regions, x, y = _problem()
    with pytest.raises(ValueError, match="val_fraction"):
        fine_tune(clf, vae, regions, {0: 1}, x_train=x, y_train=y, x_val=x[:0], y_val=y[:0],
                  config=CorrectConfig(epochs=1, batch_size=32), out_dir=str(tmp_path),
                  progress=False)  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"lams": ()},
        {"lams": (0.01, 0.0)},
        {"max_val_drop": 2.0},
        {"max_region_drop": -0.1},
        {"select_samples": 0},
    ],  # fmt: skip
)
def test_bad_selection_settings_are_rejected(change):
    with pytest.raises(ValueError):
        dataclasses.replace(CorrectConfig(), **change)


def test_a_run_that_chooses_on_validation_needs_a_validation_split():
    from defuse_jax.data import DataConfig
    from defuse_jax.run_config import RunConfig

    with pytest.raises(ValueError, match="--no-correct-select"):
        RunConfig(data=DataConfig(val_fraction=0.0))
    RunConfig(data=DataConfig(val_fraction=0.0), correct=CorrectConfig(select=False))


def test_churn_images_are_a_seeded_subset_of_a_large_training_split(monkeypatch):
    vae, clf, regions, x, y = _problem()
    monkeypatch.setattr(sel.training_lengths, "CHURN_IMAGES", 10)
    kw = dict(x_val=x[64:], y_val=y[64:], samples=4, tau=0.01, min_error_rate=0.5)
    data = sel.selection_data(clf, vae, regions, {0: 1}, x_train=x[:64], y_train=y[:64],
                              seed=0, **kw)  # fmt: skip
    assert data.x_shifted.shape == (4 * 10, 8, 8, 1)
    rows = [i for i in range(64) if any(np.array_equal(sel.shifted_images(x[i : i + 1])[0], s)
                                        for s in data.x_shifted[:10])]  # fmt: skip
    assert len(rows) == 10 and np.array_equal(data.y_shifted[:10], y[rows])
    again = sel.selection_data(clf, vae, regions, {0: 1}, x_train=x[:64], y_train=y[:64],
                               seed=0, **kw)  # fmt: skip
    np.testing.assert_array_equal(again.x_shifted, data.x_shifted)
    small = sel.selection_data(clf, vae, regions, {0: 1}, x_train=x[:8], y_train=y[:8],
                               seed=0, **kw)  # fmt: skip
    np.testing.assert_array_equal(small.x_shifted, sel.shifted_images(x[:8]))  # all of them


@pytest.mark.parametrize("rows, region_rows", [(32, 16), (8, 4)])
def test_a_shard_of_the_batch_draws_its_share_of_the_region_samples(rows, region_rows, monkeypatch):
    """With fixed-order sums (`reduction_shards`) the loss sees shards of the batch: each draws
    its share of `region_batch_size`, so a step decodes as many region samples as without."""
    from defuse_jax import correction

    vae, clf, regions, x, y = _problem()
    decoded = []
    real = correction.models.decode

    def counting(params, z):
        decoded.append(z.shape[0])
        return real(params, z)

    monkeypatch.setattr(correction.models, "decode", counting)
    loss = correction.make_correction_loss(
        vae, regions.means, np.linalg.cholesky(regions.covariances), np.asarray([1, 2]),
        lam=0.1, region_batch_size=16, batch_size=32,
    )  # fmt: skip
    batch = {"x": x[:rows], "y": y[:rows]}
    loss(clf, batch, jax.random.key(0), np.int32(0))
    assert decoded == [region_rows]


def test_a_weight_given_as_data_is_the_weight_given_as_a_number_in_one_compiled_program():
    """`lam=None` reads the weight from the batch (`with_region_weight`): the same loss and
    gradients as the weight written into the program, and every weight one compiled program."""
    from defuse_jax import correction

    vae, clf, regions, x, y = _problem()

    def make(lam):
        return correction.make_correction_loss(
            vae, regions.means, np.linalg.cholesky(regions.covariances), np.asarray([1, 2]),
            lam=lam, region_batch_size=16, batch_size=32,
        )  # fmt: skip

    def value_and_grad(loss_fn):
        def total(state, batch, key):
            return loss_fn(models.Params(clf.graphdef, state), batch, key, np.int32(0))[0]

        return jax.jit(jax.value_and_grad(total))

    data, key = {"x": x[:32], "y": y[:32]}, jax.random.key(0)
    from_data = value_and_grad(make(None))
    for lam in (0.003, 0.1):
        want = value_and_grad(make(lam))(clf.state, data, key)
        got = from_data(clf.state, correction.with_region_weight(data, lam), key)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    assert from_data._cache_size() == 1
