"""The oracle as an ensemble: the members' mean probability, its files, and how many members a
run trains (`RunConfig.oracle_members`)."""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from defuse_jax import data, models
from defuse_jax import train_models as tm
from defuse_jax.models import Classifier, ClassifierConfig, params_of
from defuse_jax.run_config import RunConfig, config_from_dict, stage_fingerprints
from defuse_jax.search.config import SearchConfig
from defuse_jax.stages import label as label_stage
from defuse_jax.training import TrainConfig


def _classifiers(n, shape=(8, 8, 1)):
    return [
        params_of(
            Classifier(ClassifierConfig(), image_shape=shape, num_classes=10, rngs=nnx.Rngs(i))
        )  # fmt: skip
        for i in range(n)
    ]


def test_ensemble_returns_the_log_of_the_members_mean_probability():
    members = _classifiers(3)
    x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1))
    out = jax.jit(models.logits)(models.ensemble_of(members), x)
    probs = np.mean([np.asarray(jax.nn.softmax(models.logits(m, x))) for m in members], 0)
    np.testing.assert_allclose(np.exp(np.asarray(out)), probs, rtol=1e-5, atol=1e-7)
    # Its weights cast like any classifier's (the search's bfloat16 forward pass).
    low = models.cast_params(models.ensemble_of(members), "bfloat16")
    assert models.logits(low, x.astype(jnp.bfloat16)).shape == (5, 10)


def test_one_member_is_that_classifier_and_none_is_an_error():
    (member,) = _classifiers(1)
    assert models.ensemble_of([member]) is member
    with pytest.raises(ValueError, match="at least one member"):
        models.Ensemble([])


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset(data.DataConfig(max_train=128, max_test=64))


# Two members at each of two shifts covers the layout of several members at one shift too
# (seed + k at each shift in turn); the case of its own cost 10 s.
@pytest.mark.parametrize("members, shifts", [(1, None), (2, (0, 1))])
def test_train_ensemble_lays_out_reloads_and_records_its_members(digits, members, shifts,
                                                                 tmp_path):  # fmt: skip
    out = str(tmp_path / "oracle")
    train = TrainConfig(epochs=1, batch_size=32, seed=5, shift=0)
    trained = tm.train_ensemble(digits, out_dir=out, members=members, config=ClassifierConfig(),
                                train=train, shifts=shifts, progress=False)  # fmt: skip
    # Member 0 where a single classifier would be, member k in member<k>/ with seed + k; with
    # several shifts, `members` per shift, seed + k at each shift in turn.
    groups = len(shifts or (0,))
    total = members * groups
    for i in range(total):
        saved = json.load(open(os.path.join(tm.member_dir(out, i), "config.json")))
        assert saved["train"]["seed"] == 5 + i // groups
        assert saved["train"]["shift"] == (shifts or (0,))[i % groups]
    assert not os.path.exists(os.path.join(out, f"member{total}"))
    record = tm.ensemble_record(out)
    assert record["members"] == total and len(record["member_test"]) == total
    reloaded = tm.load_ensemble(out)
    x = digits.x_test
    np.testing.assert_array_equal(models.logits(reloaded, x), models.logits(trained.params, x))
    accuracy = float((np.asarray(models.logits(reloaded, x)).argmax(-1) == digits.y_test).mean())
    assert record["test"]["accuracy"] == pytest.approx(accuracy)
    # The search's committee: one ensemble per shift, of the members trained with it.
    groups = tm.load_shift_groups(out)
    assert len(groups) == len(shifts or (0,))
    for g, group in enumerate(groups):
        alone = models.ensemble_of([tm.load_trained(tm.member_dir(out, i))[0]
                                    for i in range(total) if i % len(groups) == g])  # fmt: skip
        np.testing.assert_array_equal(models.logits(group, x), models.logits(alone, x))
    # The same groups from the ensemble in memory (the search stage's way: no reload).
    in_memory = tm.shift_groups(models.ensemble_members(trained.params), len(groups))
    for group, kept in zip(groups, in_memory, strict=True):
        np.testing.assert_array_equal(models.logits(kept, x), models.logits(group, x))
    committee = models.validity_function(groups)(x)
    assert committee.shape == ((len(groups),) if len(groups) > 1 else ()) + (len(x), 10)
    # A directory from before ensembles (no ensemble.json) is one member.
    os.remove(os.path.join(out, tm.ENSEMBLE_FILE))
    old = tm.ensemble_record(out)
    assert old["members"] == 1 and old["test"] == pytest.approx(record["member_test"][0])


def _ctx(shape, *, classifier=None, members=None, own=None):
    config = RunConfig(classifier=classifier, oracle_members=members)
    return types.SimpleNamespace(config=config, dataset=types.SimpleNamespace(image_shape=shape),
                                 own_classifier=own)  # fmt: skip


@pytest.mark.parametrize(
    "shape, classifier, members, own, expected",
    [
        ((8, 8, 1), None, None, None, 3),  # MLP classifier, MLP oracle
        ((28, 28, 1), None, None, None, 3),  # conv and conv
        ((28, 28, 1), ClassifierConfig(kind="mlp"), None, None, 1),  # a conv oracle is stronger
        ((28, 28, 1), ClassifierConfig(kind="mlp"), None, object(), 3),  # the user's own model
        ((28, 28, 1), None, 5, None, 5),  # asked for
    ],
)
def test_how_many_members_the_oracle_has(shape, classifier, members, own, expected):
    ctx = _ctx(shape, classifier=classifier, members=members, own=own)
    assert label_stage.oracle_members(ctx) == expected


def test_the_member_count_redoes_the_stages_that_train_the_oracle(tmp_path):
    paper = SearchConfig(validity="none")
    fp = {m: stage_fingerprints(RunConfig(search=paper, oracle_members=m), str(tmp_path))
          for m in (None, 1, 3)}  # fmt: skip
    assert fp[None]["search"] == fp[3]["search"]  # the paper's search uses no oracle
    assert len({fp[m]["label"] for m in fp}) == 3
    # The default search's validity model is the oracle: its member count redoes the search.
    search = {m: stage_fingerprints(RunConfig(oracle_members=m), str(tmp_path)) for m in (None, 3)}
    assert search[None]["search"] != search[3]["search"]
    with pytest.raises(ValueError, match="oracle_members"):
        RunConfig(oracle_members=0)


@pytest.mark.parametrize(
    "shape, asked, expected",
    [((8, 8, 1), None, (0, 1)), ((28, 28, 1), None, (0, 2)), ((64, 64, 3), None, (0, 4)),
     ((28, 28, 1), 0, (0,)), ((8, 8, 1), 0, (0,)), ((28, 28, 1), 2, (2,)),
     ((16, 16, 1), (1, 0), (1, 0))],
)  # fmt: skip
def test_how_far_the_oracle_shifts_its_training_images(shape, asked, expected, tmp_path):
    """By default a committee: members unshifted and members shifted by a fourteenth of the
    side, at least one pixel (on 8x8 images a fourteenth is none)."""
    ctx = _ctx(shape)
    ctx.config = RunConfig(oracle_shift=asked)
    ctx.dataset.x_train = np.zeros((1145,) + shape, np.float32)
    _, train = label_stage._oracle_settings(ctx)
    assert label_stage.oracle_shifts(ctx) == expected and train.shift == expected[0]
    # Asked for, it redoes the stages that train the oracle; left unset, runs keep theirs.
    fp = stage_fingerprints(ctx.config, str(tmp_path))
    unset = stage_fingerprints(RunConfig(), str(tmp_path))
    assert (fp["search"] == unset["search"]) == (asked is None)


def test_one_oracle_shift_keeps_the_fingerprints_of_runs_made_before_several(tmp_path):
    # config.json of a run made before several shifts could be given holds one number.
    old = config_from_dict({**dataclasses.asdict(RunConfig()), "oracle_shift": 1})
    assert old.oracle_shift == (1,)
    fp = {k: stage_fingerprints(RunConfig(oracle_shift=k), str(tmp_path))
          for k in (1, (1,), (0, 1), (1, 0))}  # fmt: skip
    assert fp[1] == fp[(1,)] == stage_fingerprints(old, str(tmp_path))
    assert fp[(0, 1)]["search"] != fp[(1,)]["search"]
    assert fp[(0, 1)]["search"] != fp[(1, 0)]["search"]  # the members' order is the ensemble's


@pytest.mark.parametrize("shift", [-1, (), (1, 1), (0, -2), 1.5, True])
def test_bad_oracle_shifts_name_the_field(shift):
    with pytest.raises(ValueError, match="oracle_shift"):
        RunConfig(oracle_shift=shift)


def test_several_shifts_give_the_oracle_another_identity():
    ctx = _ctx((8, 8, 1))
    ctx.dataset.x_train = np.zeros((1145, 8, 8, 1), np.float32)
    ctx.dataset_sha256 = "data"
    identities = []
    for shift in (None, (0, 1), 0, 1):
        ctx.config = RunConfig(oracle_shift=shift)
        identities.append(label_stage.oracle_identity(ctx))
    # Unset is (0, 1) on 8x8: the same oracle. One shift keeps the identity it always had.
    assert identities[0] == identities[1] and identities[1]["shifts"] == [0, 1]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 3
    assert "shifts" not in identities[2] and "shift" not in identities[2]["train"]
    assert "shifts" not in identities[3] and identities[3]["train"]["shift"] == 1
