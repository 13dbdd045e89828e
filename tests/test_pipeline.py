"""End-to-end Defuse on a tiny digits config: report, resume, invalidation and failure paths."""

import dataclasses
import json
import os
import shutil
import typing

import numpy as np
import pytest
from PIL import Image

from defuse_jax import evaluation, labeling, pipeline
from defuse_jax import regions as regions_lib
from defuse_jax import report as report_lib
from defuse_jax import train_models as tm
from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.models import VAEConfig
from defuse_jax.regions import DistillConfig
from defuse_jax.run_config import DEFAULT_SEARCH, STAGES, RunConfig
from defuse_jax.stages import distill as distill_stage
from defuse_jax.training import TrainConfig

TINY = RunConfig(
    data=DataConfig(max_train=600, max_test=200),
    # The reference's unconditional VAE: these tests check the pipeline's mechanics, and the
    # default (conditional) VAE's pilot and per-class mixtures cost ~10 s per run. The default
    # has its own run below (test_a_conditional_vae_...), and the notebook's test runs it.
    vae=VAEConfig(kind="mlp"),
    vae_train=TrainConfig(epochs=15, batch_size=32, learning_rate=2e-3),
    classifier_train=TrainConfig(epochs=6, batch_size=32, learning_rate=2e-3),
    max_sources=80,
    search=dataclasses.replace(DEFAULT_SEARCH, num_samples=64, chunk_size=1024),
    distill=DistillConfig(n_components=8, max_iter=100, min_codes=5, error_samples=32),
    grid_samples=4,
    # One region weight keeps these runs short; the choice among several has its own tests.
    correct=CorrectConfig(epochs=2, batch_size=32, lams=(0.01,), select_samples=64),
    # One oracle model keeps these runs short (three cost ~9 s per run): one member and one
    # shift, where the 8x8 default is a committee of two shifts. tests/test_oracle.py covers
    # the ensemble, test_search_validity_... below and the notebook's test the committee.
    oracle_members=1,
    oracle_shift=0,
    progress=False,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with the (slow) train stage done, copied by each test."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    pipeline.run(run_dir, TINY, until="train", log=lambda s: None)
    return run_dir


@pytest.fixture(scope="module")
def finished(trained, tmp_path_factory):
    """A copy of `trained` with every stage done, and the log of that run (tests copy it too)."""
    run_dir = _copy(trained, tmp_path_factory.mktemp("finished"))
    logs = []
    pipeline.run(run_dir, TINY, log=logs.append)
    return run_dir, logs


def _copy(run_dir, tmp_path):
    dest = str(tmp_path / "run")
    shutil.copytree(run_dir, dest)
    return dest


def _report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def test_full_run_report_and_resume(finished, tmp_path):
    run_dir, logs = _copy(finished[0], tmp_path), list(finished[1])
    assert "[train] done earlier, skipped" in logs
    report = _report(run_dir)
    # report.json has exactly the documented schema (plots included: the run drew some).
    assert set(report) == set(typing.get_type_hints(report_lib.Report))
    assert set(report["correction"]) == set(typing.get_type_hints(report_lib.CorrectionReport))
    for rec in report["regions"]:
        assert set(rec) == set(typing.get_type_hints(report_lib.RegionReport))
    assert report["num_errors_found"] > 0 and report["num_regions"] >= 1
    # Every error region is labeled (by the default labeler, the oracle); the others are
    # listed, never offered.
    errors = [r for r in report["regions"] if r["error_region"]]
    others = [r for r in report["regions"] if not r["error_region"]]
    assert errors and report["num_regions_labeled"] == len(errors)
    assert report["num_non_error_regions"] == len(others)
    assert report["num_codes_in_non_error_regions"] == sum(r["num_codes"] for r in others)
    assert all(r["error_rate"] >= 0.5 for r in errors)
    assert all(r["error_rate"] < 0.5 and r["label"] is None for r in others)
    assert all(0.0 < r["purity"] <= 1.0 for r in report["regions"])
    # The evaluation-only judge read every kept code (few here), and each region's own.
    found = report["bug_yield"]
    assert found["codes_judged"] == report["num_errors_found"] and "SVC" in found["judge"]
    assert 0.0 <= found["bug"] <= 1.0 - found["class_change"]
    # ... and, for scale, the classifier's own test errors
    wrong = round((1.0 - report["test_accuracy_before"]) * TINY.data.max_test)
    assert found["test_errors"] == wrong > 0 and 0.0 <= found["test_error_yield"] <= 1.0
    # ... chosen among its candidates (8x8 images: the SVC alone), whose table it heads
    (only,) = found["judges"]
    assert only["chosen"] and only["judge"] == found["judge"] and only["bug"] == found["bug"]
    # ... and its second opinion on every labeled region's label
    labeled = [r for r in report["regions"] if r["label"] is not None]
    assert all(0.0 <= r["judge_agreement"] <= 1.0 for r in labeled)
    assert 0 <= found["confirmed_judge_agrees"] <= report["num_regions_confirmed"]
    assert all(0.0 <= r["bug_yield"] <= 1.0 for r in report["regions"])
    # The accuracy on the found codes covers the codes of the labeled regions, and says so.
    in_labeled = sum(r["num_codes"] for r in report["regions"] if r["label"] is not None)
    assert report["num_error_codes_labeled"] == in_labeled > 0
    assert (
        f"Accuracy on the {in_labeled:,} found error codes in labeled regions"
        in open(os.path.join(run_dir, "report.md")).read()
    )
    for key in ("test_accuracy_before", "test_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["stage_seconds"]) >= {"train", "search", "distill", "label", "correct"}
    for rec in report["regions"]:
        assert os.path.exists(os.path.join(run_dir, rec["grid"]))
        labeled = rec["error_region"]  # only error regions are labeled and evaluated
        assert (
            (rec["accuracy_before"] is not None) == labeled == (rec["accuracy_after"] is not None)
        )
        # A labeled region counts as an error under its label when the classifier gets at most
        # half of its held-out samples right under that label.
        assert rec["confirmed_error"] == (1 - rec["accuracy_before"] >= 0.5 if labeled else None)
        assert rec["overlaps_with"] == [] or rec["contested"] is not None
    confirmed = [r for r in errors if r["confirmed_error"]]
    assert report["num_regions_confirmed"] == len(confirmed)
    # Region accuracy covers the confirmed error regions, or every labeled one if there is none.
    scope = confirmed or [r for r in errors if r["label"] is not None]
    assert report["region_accuracy_scope"] == ("confirmed" if confirmed else "labeled")
    for when in ("before", "after"):
        want = np.mean([r[f"accuracy_{when}"] for r in scope]) if scope else None
        assert report[f"region_accuracy_{when}"] == pytest.approx(want)
    assert os.path.exists(os.path.join(run_dir, "report.md"))
    assert os.path.exists(os.path.join(run_dir, "plots", "latent_pca.png"))
    assert os.path.exists(os.path.join(run_dir, "label", "oracle", "config.json"))
    labels_csv = os.path.join(run_dir, "label", "labels.csv")
    labels = labeling.read_labels(
        labels_csv, region_ids=[r["id"] for r in errors], class_names=report["class_names"]
    )
    assert labels == {r["id"]: r["label"] for r in errors}
    assert all(0 <= v < len(report["class_names"]) for v in labels.values())
    with open(labels_csv) as f:
        assert all(line.rstrip().endswith(",oracle") for line in f.readlines()[1:])
    assert labeling.listed_regions(os.path.join(run_dir, "label", "labels.csv")) == [
        r["id"] for r in errors
    ]  # the others are not offered

    # The same command again redoes nothing, and returns the report.
    logs.clear()
    again = pipeline.run(run_dir, TINY, log=logs.append)
    assert all("done earlier" in line for line in logs), logs
    assert again["evaluate"] == report

    # A distill change keeps train and search, redoes distill and everything after it, and
    # keeps the previous outputs under stale/.
    changed = dataclasses.replace(TINY, distill=dataclasses.replace(TINY.distill, method="gmm"))
    logs.clear()
    pipeline.run(run_dir, changed, log=logs.append)
    assert "[search] done earlier, skipped" in logs
    assert "[distill] running" in logs and "[correct] running" in logs
    stale = os.listdir(os.path.join(run_dir, "stale"))
    assert any(s.startswith("distill-") for s in stale) and any(
        s.startswith("label-") for s in stale
    )


def test_search_validity_keeps_only_what_the_oracle_reads_as_the_source(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    config = dataclasses.replace(
        TINY, search=dataclasses.replace(TINY.search, validity="oracle", num_samples=256),
        oracle_shift=None,  # the default on 8x8 images: a committee of shifts 0 and 1
    )  # fmt: skip
    logs = []
    summary = pipeline.run(run_dir, config, until="search", log=logs.append)["search"]
    # The search stage trained the oracle (where the label stage will find it) before searching:
    # on 8x8 images one member unshifted and one shifted by a pixel, each of which must read
    # the source class (the committee), so their mean reads it too.
    assert sum(line.startswith("oracle (2 classifiers): test accuracy") for line in logs) == 1
    oracle_dir = os.path.join(run_dir, "label", "oracle")
    assert tm.ensemble_record(oracle_dir)["shifts"] == [0, 1]
    errors = np.load(os.path.join(run_dir, "search", "errors.npz"))
    assert summary["num_errors_found"] == len(errors["z"]) > 0
    ctx = pipeline.Context(run_dir, config, print)
    for reader in [*tm.load_shift_groups(oracle_dir), ctx.model("oracle")]:
        read = evaluation.predict(ctx.model("vae"), reader, errors["z"])
        np.testing.assert_array_equal(read, errors["source_label"])
    assert (errors["pred_label"] != errors["source_label"]).all()
    # `defuse-jax bench search --out RUN` times this run's own search (the chunk chosen anew):
    # with its committee it keeps the same codes; without, a superset of the flips.
    from defuse_jax.bench import search_bench

    bench = search_bench.trained_run(run_dir, 1, modes=False)["searches"]
    assert (bench["oracle"]["groups"], bench["oracle"]["found"]) == (2, summary["num_errors_found"])
    assert bench["none"]["flips"] >= bench["oracle"]["flips"] == summary["num_flips"]


def _oracle_checkpoints(run_dir):
    """{file under label/oracle/ckpt: mtime}: changes when the oracle is trained again."""
    ckpt = os.path.join(run_dir, "label", "oracle", "ckpt")
    return {
        os.path.relpath(os.path.join(d, f), ckpt): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(ckpt)
        for f in files
    }


def test_the_oracle_outlives_redone_search_and_label_stages(finished, tmp_path):
    # A finished run of the validity search switched to the paper's search and back: each
    # switch redoes the search and sets the outdated label stage aside, but the oracle depends
    # on neither, so it stays in label/oracle/ and is reloaded, never trained again.
    run_dir = _copy(finished[0], tmp_path)
    before = _oracle_checkpoints(run_dir)
    assert before
    for validity in ("none", "oracle"):
        search = dataclasses.replace(TINY.search, validity=validity)
        config = dataclasses.replace(TINY, search=search)
        logs = []
        pipeline.run(run_dir, config, until="label", log=logs.append)
        assert any(line.startswith("[label] ") and "moved to" in line for line in logs)
        assert not any(line.startswith("oracle: trained on other") for line in logs)
        # (the report's oracle accuracy comes from ensemble.json)
        assert os.path.exists(os.path.join(run_dir, "label", "oracle", "ensemble.json"))
        assert _oracle_checkpoints(run_dir) == before
    stale = sorted(d for d in os.listdir(os.path.join(run_dir, "stale")) if d.startswith("label-"))
    assert len(stale) == 2
    for d in stale:
        assert os.path.exists(os.path.join(run_dir, "stale", d, "labels.csv"))
        assert not os.path.exists(os.path.join(run_dir, "stale", d, "oracle"))
    # Resumed, nothing is redone: the oracle the stages recorded is where they left it.
    logs = []
    pipeline.run(run_dir, config, until="label", log=logs.append)
    assert all(f"[{s}] done earlier, skipped" in logs for s in STAGES[:4])


def _other_data(recorded):
    return {**recorded, "data": "0" * 64}


@pytest.mark.parametrize(
    "legacy, retrained",
    [
        (False, True),  # its record says other data, as if the training data had changed since
        (True, False),  # no record, as an earlier version left it: its config.json matches
    ],
)
def test_the_search_reuses_the_oracle_only_when_it_was_trained_on_this_data(
    finished, tmp_path, legacy, retrained
):
    run_dir = _copy(finished[0], tmp_path)
    oracle_dir = os.path.join(run_dir, "label", "oracle")
    identity = os.path.join(oracle_dir, "identity.json")
    with open(identity) as f:
        recorded = json.load(f)
    os.remove(identity)
    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, scale=0.6))
    if legacy:  # as earlier versions left a one-member oracle: no ensemble.json either
        os.remove(os.path.join(oracle_dir, tm.ENSEMBLE_FILE))
    else:
        with open(identity, "w") as f:
            json.dump(_other_data(recorded), f)
    before = _oracle_checkpoints(run_dir)
    logs = []
    pipeline.run(run_dir, config, until="search", log=logs.append)
    moved = [line for line in logs if line.startswith("oracle: trained on other data")]
    stale = os.path.join(run_dir, "stale")
    set_aside = [d for d in os.listdir(stale) if d.startswith("oracle-")]
    assert len(moved) == len(set_aside) == int(retrained)
    assert (_oracle_checkpoints(run_dir) == before) != retrained
    # Either way the oracle now records what it was trained on.
    with open(identity) as f:
        assert json.load(f) == recorded


def test_interrupted_run_resumes_without_redoing_finished_stages(finished, tmp_path):
    run_dir = _copy(finished[0], tmp_path)
    # As a run stopped before its correction leaves it: every stage before it done.
    shutil.rmtree(os.path.join(run_dir, "correct"))
    errors_mtime = os.path.getmtime(os.path.join(run_dir, "search", "errors.npz"))
    logs = []
    pipeline.run(run_dir, TINY, log=logs.append)
    done = [f"[{s}] done earlier, skipped" for s in ("train", "search", "distill", "label")]
    assert logs[:4] == done and "[correct] running" in logs and "[evaluate] running" in logs
    assert os.path.getmtime(os.path.join(run_dir, "search", "errors.npz")) == errors_mtime
    assert _report(run_dir)["correction"] == _report(finished[0])["correction"] | {
        "seconds": _report(run_dir)["correction"]["seconds"]
    }


def test_no_errors_found_gives_a_clear_report(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    # (the default VAE is conditional: its search takes the scale from search_scales' pilot)
    tiny_scale = dataclasses.replace(TINY, search_scales=(1e-6,))
    logs = []
    pipeline.run(run_dir, tiny_scale, log=logs.append)
    report = _report(run_dir)
    assert report["num_errors_found"] == 0 and report["num_regions"] == 0
    assert report["region_accuracy_before"] is None and report["correction"]["skipped"]
    assert any("no errors" in m for m in report["messages"])
    assert report["test_accuracy_after"] == report["test_accuracy_before"]
    assert any("too few to distill" in line for line in logs)


def test_a_mixture_that_keeps_no_region_says_what_to_change(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    # No component of the mixture holds 99% of the codes.
    distill = dataclasses.replace(TINY.distill, weight_cutoff=0.99)
    logs = []
    pipeline.run(run_dir, dataclasses.replace(TINY, distill=distill), log=logs.append)
    report = _report(run_dir)
    assert report["num_errors_found"] > 0 and report["num_regions"] == 0
    (note,) = [m for m in report["messages"] if "kept no region" in m]
    assert "--distill-weight-cutoff" in note and "per_label" not in note
    assert any(line.startswith("distill: the mixture kept no region") for line in logs)
    # Per predicted class, the note also names the component count to lower.
    per_label = regions_lib.no_region_note(500, 0, dataclasses.replace(distill, per_label=True))
    assert "n_components=8" in per_label and "try 3" in per_label
    assert regions_lib.no_region_note(500, 1, distill) is None  # a region was kept
    assert regions_lib.no_region_note(1, 0, distill) is None  # too few codes to fit: said apart


def test_every_region_below_the_error_threshold_still_evaluates(trained, tmp_path, monkeypatch):
    """Regions exist but none is an error region: nothing to label, test accuracy still measured."""
    real = distill_stage.distill

    def quiet_distill(*args, **kwargs):
        regions = real(*args, **kwargs)
        for rec in regions.records:  # as if the classifier got every region sample right
            rec.update(error_rate=0.0, error_region=False)
        return regions

    monkeypatch.setattr(distill_stage, "distill", quiet_distill)
    run_dir = _copy(trained, tmp_path)
    pipeline.run(run_dir, dataclasses.replace(TINY, labeler="source"), log=lambda s: None)
    report = _report(run_dir)
    assert report["num_regions"] >= 1
    assert report["num_non_error_regions"] == report["num_regions"]
    assert report["num_regions_labeled"] == 0 and report["correction"]["skipped"]
    assert report["region_accuracy_before"] is None and report["region_accuracy_after"] is None
    assert 0.5 < report["test_accuracy_before"] == report["test_accuracy_after"] <= 1.0
    with open(os.path.join(run_dir, "report.md")) as f:
        md = f.read()
    assert "are **not error regions**" in md and "**No region is labeled**" in md


def test_a_finished_run_reruns_without_its_data_being_checked(finished, tmp_path, monkeypatch):
    """The data check guards a new data config; a run that already used its config skips its
    done stages even when the data is no longer where it was (a moved TFDS data_dir)."""

    def gone(config):
        raise AssertionError("the unchanged data config was checked")

    monkeypatch.setattr(pipeline, "check_available", gone)
    run_dir = _copy(finished[0], tmp_path)
    logs = []
    pipeline.run(run_dir, TINY, log=logs.append)
    assert sum("done earlier, skipped" in line for line in logs) == len(pipeline.STAGES)
    with pytest.raises(AssertionError, match="was checked"):
        pipeline.run(run_dir, dataclasses.replace(TINY, data=DataConfig(max_train=500)))


def test_labeling_an_automatically_labeled_run_by_hand_asks_every_region(finished, tmp_path):
    """`defuse-jax label --labeler manual` on a finished oracle-labeled run sets the oracle's
    label stage aside and asks every error region in the same session."""
    run_dir = _copy(finished[0], tmp_path)
    report = _report(run_dir)
    ids = sorted(r["id"] for r in report["regions"] if r["error_region"])
    asked = []

    def answer(prompt):
        asked.append(prompt)
        return "skip"

    manual = dataclasses.replace(TINY, labeler="manual")
    answers = pipeline.label_interactively(run_dir, manual, input_fn=answer, print_fn=print)
    assert sorted(answers) == ids and all(v is None for v in answers.values())
    assert len(asked) == len(ids)
    assert any(n.startswith("label-") for n in os.listdir(os.path.join(run_dir, "stale")))
    pipeline.run(run_dir, manual, log=lambda s: None)  # no LabelsPending: all answered
    assert _report(run_dir)["num_regions_skipped"] == len(ids)


def test_manual_labels_all_skipped_skips_correction(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    # Under an automatic labeler the label stage would overwrite answers typed in: refused early.
    with pytest.raises(ValueError, match="labeler 'oracle'.*add --labeler manual"):
        pipeline.label_interactively(run_dir, TINY, input_fn=lambda prompt: "3")
    with pytest.raises(ValueError, match="label stage has not finished"):
        pipeline.set_labels(run_dir, TINY, {0: "3"})
    assert not os.path.exists(os.path.join(run_dir, "label"))
    # Without an oracle (no validity model, no oracle check), which this test does not need.
    manual = dataclasses.replace(
        TINY, labeler="manual", search=dataclasses.replace(TINY.search, validity="none"),
        oracle_check=False,
    )  # fmt: skip
    with pytest.raises(pipeline.LabelsPending, match="labels.csv"):
        pipeline.run(run_dir, manual, log=lambda s: None)
    path = os.path.join(run_dir, "label", "labels.csv")
    assert os.path.exists(path)
    # A person rejects every region in the terminal.
    answers = pipeline.label_interactively(
        run_dir, manual, input_fn=lambda prompt: "skip", print_fn=lambda *a, **k: None
    )
    assert answers and all(v is None for v in answers.values())
    pipeline.run(run_dir, manual, log=lambda s: None)
    report = _report(run_dir)
    offered = report["num_regions"] - report["num_non_error_regions"]
    assert report["num_regions_labeled"] == 0 and report["num_regions_skipped"] == offered
    assert report["correction"]["skipped"] and report["region_accuracy_after"] is None
    # The person's answers survive a rerun of the label stage.
    ids = [r["id"] for r in report["regions"] if r["error_region"]]
    labels = labeling.read_labels(path, region_ids=ids, class_names=report["class_names"])
    assert labels == answers
    # A labels file that lost rows (as a truncated one does) is not trusted, nor moved away from
    # the person: the label stage is redone around it, keeping its answers, asking for the rest.
    with open(path) as f:
        header, first, *_ = f.readlines()
    with open(path, "w") as f:
        f.write(header + first)
    with pytest.raises(pipeline.LabelsPending, match=f"{len(ids) - 1} of {len(ids)} regions"):
        pipeline.run(run_dir, manual, log=lambda s: None)
    labels = labeling.read_labels(path, region_ids=ids, class_names=report["class_names"])
    assert labels == {ids[0]: None}


# A file each stage's completion rests on, truncated as a kill during a plain write left it.
# A plain file of most stages (the same code handles every file) and every model's checkpoint.
DAMAGE = (
    ("search/errors.npz", "search"),
    ("search/stage.json", "search"),  # the stage's own record
    ("distill/regions.npz", "distill"),
    ("label/labels.csv", "label"),
    ("label/region_000.png", "label"),
    ("correct/classifier/config.json", "correct"),
    ("report.json", "evaluate"),
    # Each model's checkpoint: the largest file of its last step (resolved by `_damaged_path`).
    ("train/vae/ckpt", "train"),
    ("train/classifier/ckpt", "train"),
    ("label/oracle/ckpt", "label"),
    ("correct/classifier/ckpt", "correct"),
)


def _damaged_path(run_dir, rel):
    """(file to damage, what is set aside): `rel` itself, or for a checkpoint directory the
    largest file of its last step and that step's directory."""
    if not rel.endswith("/ckpt"):
        return rel, rel
    ckpt = os.path.join(run_dir, *rel.split("/"))
    step = max((d for d in os.listdir(ckpt) if d.isdigit()), key=int)
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ckpt, step)) for f in fs]
    largest = os.path.relpath(max(files, key=os.path.getsize), run_dir).replace(os.sep, "/")
    return largest, f"{rel}/{step}"


def _snapshot(directory):
    """{file: modification time} of every file below `directory`."""
    return {
        os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
        for root, _, fs in os.walk(directory)
        for f in fs
    }


def _load(path):
    """Read a run file with the reader its format needs (raises if it is damaged)."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.endswith(".png"):
        with Image.open(path) as im:
            im.load()  # decodes every pixel: a truncated PNG raises
        return None
    if path.endswith(".csv"):
        return labeling.listed_regions(path)
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("rel,stage", DAMAGE, ids=[rel for rel, _ in DAMAGE])
def test_a_damaged_output_is_moved_aside_and_its_stage_redone(finished, tmp_path, rel, stage):
    run_dir = _copy(finished[0], tmp_path)
    rel, aside = _damaged_path(run_dir, rel)
    path = os.path.join(run_dir, *rel.split("/"))
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "r+b") as f:
        f.truncate(len(whole) // 2)
    ckpts = {m: _snapshot(os.path.join(run_dir, "train", m, "ckpt")) for m in ("vae", "classifier")}
    logs = []
    pipeline.run(run_dir, TINY, until=stage, log=logs.append)

    upstream = STAGES[: STAGES.index(stage)]
    assert logs[: len(upstream)] == [f"[{s}] done earlier, skipped" for s in upstream]
    why = "is unreadable" if rel.endswith("stage.json") else f"damaged output ({rel} "
    assert why in logs[len(upstream)] and logs[len(upstream) + 1] == f"[{stage}] running", logs
    if aside != rel:  # a checkpoint: its step is written again (training resumed, or redone)
        assert os.path.isdir(os.path.join(run_dir, *aside.split("/")))
    else:
        _load(path)  # whole again
    (kept,) = os.listdir(os.path.join(run_dir, "stale"))
    kept = os.path.join(run_dir, "stale", kept)
    assert os.path.basename(kept).startswith(f"{stage}-")
    if rel == "label/labels.csv":
        # The labels file is a person's: not moved (only the stage's record is), but rewritten
        # with every answer it held and a row for every error region.
        assert os.listdir(kept) == ["stage.json"]
        with open(os.path.join(finished[0], "report.json")) as f:
            offered = [r["id"] for r in json.load(f)["regions"] if r["error_region"]]
        assert sorted(_load(path)) == offered
    else:
        # What was damaged is kept under stale/, as it was (a checkpoint: its whole step).
        inside = rel.split("/", 1)[1] if rel.startswith(f"{stage}/") else rel
        with open(os.path.join(kept, *inside.split("/")), "rb") as f:
            assert f.read() == whole[: len(whole) // 2]
        assert f"{aside} " in logs[len(upstream)] or f"{aside}," in logs[len(upstream)]
    # Nothing else was trained again (a redone train stage reloads its checkpoints).
    for m, before in ckpts.items():
        if not aside.startswith(f"train/{m}/ckpt/"):
            assert _snapshot(os.path.join(run_dir, "train", m, "ckpt")) == before
    logs.clear()
    pipeline.run(run_dir, TINY, until=stage, log=logs.append)
    assert all("done earlier" in line for line in logs), logs
    if stage == "search":  # the same code for every stage: one case pays for the check
        # The next stage was computed from the outputs just replaced: it is redone too.
        after = STAGES[STAGES.index(stage) + 1]
        logs.clear()
        pipeline.run(run_dir, TINY, until=after, log=logs.append)
        assert logs[len(upstream) + 1].startswith(f"[{after}] {stage} was redone: previous outputs")
        assert logs[len(upstream) + 2] == f"[{after}] running"


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_min_error_rate_outside_the_unit_interval_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r"min_error_rate.*must lie in \[0, 1\]"):
        DistillConfig(min_error_rate=value)


def test_region_purity_and_error_regions():
    """Purity is the share of a region's codes with its most common (source, predicted) pair,
    which is not the two majorities side by side; regions whose fresh samples the classifier
    mostly gets right are not error regions."""
    import numpy as np

    from defuse_jax.regions import distill, is_error_region

    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(size=(60, 2)) * 0.1, rng.normal(size=(60, 2)) * 0.1 + 5])
    # Region near 0: 20 of 60 codes are 1 -> 7, the rest 4 -> 9, 6 -> 8 and 4 -> 2. Its majority
    # source is 4 and its majority prediction 7, a pair no code has.
    source = np.array([1] * 20 + [4] * 15 + [6] * 13 + [4] * 12 + [2] * 60)
    pred = np.array([7] * 20 + [9] * 15 + [8] * 13 + [2] * 12 + [3] * 60)
    cfg = DistillConfig(method="gmm", n_components=2, max_iter=50, min_codes=5, error_samples=64)
    # The classifier on fresh samples: wrong around the origin, right around (5, 5).
    regions = distill(codes, source, pred, num_classes=10, config=cfg,
                      predict_fn=lambda z: np.where(np.asarray(z)[:, 0] < 2.5, 7, 2))  # fmt: skip
    by_source = {r["majority_source_label"]: r for r in regions.records}
    assert by_source[4]["majority_pred_label"] == 7
    assert by_source[4]["top_pair"] == [1, 7] and by_source[4]["purity"] == pytest.approx(20 / 60)
    assert by_source[2]["top_pair"] == [2, 3] and by_source[2]["purity"] == 1.0
    assert is_error_region(by_source[4]) and by_source[4]["error_rate"] == 1.0
    assert not is_error_region(by_source[2]) and by_source[2]["error_rate"] == 0.0


def test_a_conditional_vae_keeps_each_code_s_class_through_every_stage(trained, tmp_path):
    """`--vae-conditional`: the VAE decodes from (style, class), the search perturbs the style
    alone, every region is one source class's, and the run reports as any other."""
    from defuse_jax.identification import load_errors
    from defuse_jax.models import CLASS_SCALE
    from defuse_jax.regions import load_regions

    run_dir = _copy(trained, tmp_path)  # the classifier is reused, the VAE trained anew
    # Short: no oracle (no validity model, source labels), EM mixtures, one correction.
    config = dataclasses.replace(
        TINY, vae=VAEConfig(kind="mlp", latent_dim=4, hidden=64, conditional=True),
        # One candidate: the pilot's program is the search's own (choose_scale has its test).
        search=dataclasses.replace(TINY.search, validity="none"), search_scales=(2.0,),
        labeler="source",
        oracle_check=False, distill=dataclasses.replace(TINY.distill, method="gmm"),
        correct=dataclasses.replace(TINY.correct, control=False, select=False),
    )  # fmt: skip
    report = pipeline.run(run_dir, config, log=lambda s: None)["evaluate"]
    errors = load_errors(os.path.join(run_dir, "search"))
    assert len(errors["z"]) > 0 and errors["z"].shape[1] == 4 + 10
    # The search ran at the scale its pilot chose, recorded with the pilot's counts.
    with open(os.path.join(run_dir, "search", "summary.json")) as f:
        summary = json.load(f)
    choice = summary["scale_choice"]
    assert choice["scales"] == [2.0] and summary["config"]["scale"] == choice["scale"] == 2.0
    block = CLASS_SCALE * np.eye(10)[errors["source_label"]]
    np.testing.assert_array_equal(errors["z"][:, 4:], block)
    regions = load_regions(os.path.join(run_dir, "distill"))
    assert regions.num_regions > 0
    for rec, mean in zip(regions.records, regions.means, strict=True):
        assert rec["source_label_counts"][rec["majority_source_label"]] == rec["num_codes"]
        assert mean[4:].argmax() == rec["majority_source_label"]
    assert report["bug_yield"]["codes_judged"] == len(errors["z"])
    assert report["bug_yield"]["bug"] is not None


def test_codes_that_hold_their_class_get_one_mixture_per_source_class():
    """With a conditional VAE's codes (free_dims: a style, then a class block), each region
    comes from one source class, keeps that class block exactly and has no variance in it;
    the mixtures share the components by the classes' shares."""
    import jax

    from defuse_jax.models import CLASS_SCALE
    from defuse_jax.regions import codes_fitted, distill, sample_regions

    rng = np.random.default_rng(0)
    source = np.repeat([0, 2], [60, 60])
    style = rng.normal(size=(120, 2)) * 0.1 + np.where(np.arange(120)[:, None] % 2, 3.0, 0.0)
    codes = np.concatenate([style, CLASS_SCALE * np.eye(3)[source]], axis=1).astype(np.float32)
    pred = (source + 1) % 3
    cfg = DistillConfig(method="gmm", n_components=4, max_iter=50, min_codes=5)
    regions = distill(codes, source, pred, num_classes=3, config=cfg, free_dims=2)
    assert [f["source_label"] for f in regions.fits] == [0, 2]
    assert [f["codes"] for f in regions.fits] == [60, 60]
    assert regions.num_regions == 4  # two style clusters per class, two components each
    for rec, mean, cov in zip(regions.records, regions.means, regions.covariances, strict=True):
        cls = rec["majority_source_label"]
        assert rec["source_label_counts"][cls] == rec["num_codes"]  # one class per region
        np.testing.assert_array_equal(mean[2:], CLASS_SCALE * np.eye(3)[cls])
        assert not cov[2:].any() and not cov[:, 2:].any()
    draws = sample_regions(regions, jax.random.key(0), 8, tau=0.01)
    blocks = draws[..., 2:].argmax(-1)
    assert all(set(b) == {r["majority_source_label"]} for b, r in zip(blocks, regions.records,
                                                                       strict=True))  # fmt: skip
    assert codes_fitted(pred, cfg, source_label=source) == 120


def test_the_classes_mixtures_share_one_compiled_program(monkeypatch):
    """Classes of 40, 150 and 400 codes get 1, 2 and 3 components: one program compiled for
    the largest fits all three (one per size took seconds of compiling each)."""
    import jax

    from defuse_jax.mixture import _base
    from defuse_jax.models import CLASS_SCALE
    from defuse_jax.regions import distill

    static = ("model", "cfg", "layout", "mesh")  # as `_base._fit_program`, freshly jitted
    program = jax.jit(_base._fit_program.__wrapped__, static_argnames=static)
    monkeypatch.setattr(_base, "_fit_program", program)
    rng = np.random.default_rng(1)
    source = np.repeat([0, 1, 2], [40, 150, 400])
    style = rng.normal(size=(len(source), 2)) + 4.0 * (np.arange(len(source))[:, None] % 3)
    codes = np.concatenate([style, CLASS_SCALE * np.eye(3)[source]], axis=1).astype(np.float32)
    cfg = DistillConfig(method="gmm", n_components=4, max_iter=30, min_codes=5)
    before = program._cache_size()
    regions = distill(codes, source, (source + 1) % 3, num_classes=3, config=cfg, free_dims=2)
    assert program._cache_size() == before + 1
    assert [f["codes"] for f in regions.fits] == [40, 150, 400]
    assert {r["majority_source_label"] for r in regions.records} == {0, 1, 2}


@pytest.mark.parametrize(
    "fails, regions_of",  # fits that raise an ill-defined covariance -> classes with regions
    [((), {0, 2}), (("class 2 at k>1",), {0, 2}), (("class 2 at k>1", "class 2 at k=1"), {0})],
)
def test_a_class_whose_mixture_cannot_be_fitted_forms_no_region(monkeypatch, fails, regions_of):
    """One class's codes too collapsed for its mixture: one component, else no region for that
    class, and the other classes' regions as before; a single group of every code still fails
    with the mixture's error (nothing else is left to distill)."""
    from defuse_jax import regions as regions_mod
    from defuse_jax.mixture import IllDefinedCovarianceError
    from defuse_jax.mixture._base import ILL_DEFINED_MESSAGE
    from defuse_jax.models import CLASS_SCALE

    rng = np.random.default_rng(0)
    source = np.repeat([0, 2], [60, 60])
    style = rng.normal(size=(120, 2)) * 0.1 + np.where(np.arange(120)[:, None] % 2, 3.0, 0.0)
    codes = np.concatenate([style, CLASS_SCALE * np.eye(3)[source]], axis=1).astype(np.float32)
    cfg = DistillConfig(method="gmm", n_components=4, max_iter=50, min_codes=5)
    fit = regions_mod._fit_mixture

    def flaky(x, config, seed, **kw):
        one = config.n_components == 1
        if seed == cfg.seed + 1 and f"class 2 at {'k=1' if one else 'k>1'}" in fails:
            raise IllDefinedCovarianceError(ILL_DEFINED_MESSAGE + " (injected)")
        return fit(x, config, seed, **kw)

    monkeypatch.setattr(regions_mod, "_fit_mixture", flaky)
    out = regions_mod.distill(codes, source, (source + 1) % 3, num_classes=3, config=cfg,
                              free_dims=2)  # fmt: skip
    assert {r["majority_source_label"] for r in out.records} == regions_of
    assert [f["source_label"] for f in out.fits] == sorted(regions_of)
    if len(fails) == 1:  # class 2 refitted with one component: one region for it
        assert sum(r["majority_source_label"] == 2 for r in out.records) == 1

    def never(*args, **kwargs):
        raise IllDefinedCovarianceError(ILL_DEFINED_MESSAGE)

    monkeypatch.setattr(regions_mod, "_fit_mixture", never)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        regions_mod.distill(codes, source, (source + 1) % 3, num_classes=3, config=cfg)


def test_a_mixture_fit_cut_short_is_recorded_not_warned(tmp_path):
    """A fit stopped by max_iter raises no library warning; the regions record it, and it
    survives saving."""
    import warnings

    import numpy as np

    from defuse_jax.regions import distill, load_regions, save_regions

    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(40, 2)) + 4])
    labels = np.repeat([1, 2], 40)
    for max_iter, converged in ((1, False), (100, True)):
        cfg = DistillConfig(method="gmm", n_components=2, max_iter=max_iter, min_codes=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the ConvergenceWarning would fail here
            regions = distill(codes, labels, labels + 1, num_classes=10, config=cfg)
        assert regions.converged is converged
        assert [(f["codes"], f["converged"], f["max_iter"]) for f in regions.fits] == [
            (80, converged, max_iter)
        ]
        save_regions(regions, str(tmp_path))
        assert load_regions(str(tmp_path)).fits == regions.fits


def test_oracle_agreement_in_report_labels_file_and_with_a_disagreeing_oracle(finished, tmp_path):
    """The default run checks every label with the oracle (report, labels file); an oracle
    that disagrees (the original classifier, wrong on most region samples by construction)
    flags the regions ambiguous while the source labels stay as they were."""
    import csv

    from defuse_jax import label_validity
    from defuse_jax.stages import label as label_stage

    run_dir = _copy(finished[0], tmp_path)
    report = _report(run_dir)
    labeled = [r for r in report["regions"] if r["label"] is not None]
    first_labels = {r["id"]: r["label"] for r in labeled}
    assert labeled and report["oracle_test_accuracy"] > 0.5 and report["oracle_members"] == 1
    assert 0.0 < report["oracle_on_test_errors"] <= 1.0  # a separately trained model
    agreements = [r["oracle_agreement"] for r in labeled]
    assert all(0.0 <= a <= 1.0 for a in agreements)
    assert report["oracle_agreement"] == pytest.approx(np.mean(agreements))
    assert report["num_ambiguous_regions"] == sum(r["ambiguous"] for r in labeled)
    assert all(r["ambiguous"] == (r["oracle_agreement"] < 0.5) for r in labeled)
    assert "oracle agrees" in open(os.path.join(run_dir, "report.md")).read()
    with open(os.path.join(run_dir, "label", "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {"oracle", "oracle_agreement", "ambiguous"} <= set(rows[0])
    saved = json.load(open(os.path.join(run_dir, "label", "oracle_check.json")))["regions"]
    assert [r["ambiguous"] == "yes" for r in rows] == [
        saved[r["region_id"]]["ambiguous"] for r in rows
    ]
    # The label stage checked the labels it wrote (the oracle labeler's: its own vote), as the
    # report checks the final labels.
    names = pipeline.Context(run_dir, TINY, print).dataset.class_names
    assert all(names[saved[r["region_id"]]["label"]] == r["label"] == r["oracle"] for r in rows)

    # The classifier itself as the oracle: its agreement with a label on the held-out samples is
    # exactly the region's accuracy before correction.
    ctx = pipeline.Context(os.path.abspath(run_dir), TINY, lambda s: None)
    ctx._models["oracle"] = ctx.model("classifier")
    report = pipeline.build_report(ctx)
    assert report["oracle_on_test_errors"] == 0.0  # it reads none of its own errors right
    assert "it shares the classifier's blind spots" in open(ctx.path("report.md")).read()
    labeled = [r for r in report["regions"] if r["label"] is not None]
    for r in labeled:
        assert r["oracle_agreement"] == pytest.approx(r["accuracy_before"])
        assert r["ambiguous"] == (r["accuracy_before"] < label_validity.AMBIGUOUS_BELOW)
    # The confirmed error regions are those the classifier gets mostly wrong under their label.
    assert report["num_ambiguous_regions"] == sum(bool(r["confirmed_error"]) for r in labeled)
    assert {r["id"]: r["label"] for r in labeled} == first_labels  # the flags changed no label
    # ... and so is the label stage's check against the suggested (source) labels.
    regions = pipeline.load_regions(ctx.path("distill"))
    ids = [r["id"] for r in labeled]
    checks = label_validity.label_check(
        label_stage.oracle_votes(ctx, regions, ids),
        {r["id"]: r["majority_source_label"] for r in labeled},
    )
    assert sum(c["ambiguous"] for c in checks.values()) >= 1  # error regions under the source


def _tree(run_dir):
    """{relative path: SHA-256} of every file under a directory."""
    from defuse_jax.files import sha256

    return {
        os.path.relpath(os.path.join(d, n), run_dir): sha256(os.path.join(d, n))
        for d, _, names in os.walk(run_dir)
        for n in names
    }


def _mtimes(directory):
    """{relative path: modification time in ns} of every file under a directory."""
    return {p: os.stat(os.path.join(directory, p)).st_mtime_ns for p in _tree(directory)}


def test_budget_sweep_reruns_the_stages_per_budget_and_leaves_the_source_run_alone(
    finished, tmp_path
):
    import csv

    from defuse_jax import budget_sweep, cli

    source = finished[0]
    before = _tree(source)
    out = str(tmp_path / "budget")
    # One budget keeps the test short; its search is a quarter of the source run's (64).
    assert cli.main(["sweep-budget", "--from", source, "--out", out, "--samples", "16"]) == 0
    assert _tree(source) == before  # the source run is only read
    with open(os.path.join(out, "budget.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(budget_sweep.COLUMNS)
    assert [int(r["samples_per_source"]) for r in rows] == [16]
    full = _report(source)
    assert int(rows[0]["samples_evaluated"]) * 4 == full["num_samples_evaluated"]
    assert int(rows[0]["flips"]) <= full["num_flips"]
    for r in rows:
        report = _report(os.path.join(out, r["run_dir"]))
        assert int(r["errors_kept"]) == report["num_errors_found"]
        assert int(r["regions_confirmed"]) == report["num_regions_confirmed"]
        assert int(r["regions_judge_backed"]) == report["bug_yield"]["confirmed_judge_agrees"]
        # the codes its fits took (all of them, under max_codes, behind TINY's VAE; a
        # conditional VAE's per-class mixtures leave out classes under min_codes)
        fits = json.load(open(os.path.join(out, r["run_dir"], "distill", "regions.json")))["fits"]
        assert int(r["codes_fitted"]) == sum(f["codes"] for f in fits)
        assert 0 < int(r["codes_fitted"]) <= report["num_errors_found"]
        assert int(r["max_codes"]) == 10_000  # DistillConfig.max_codes=None on a CPU
        assert float(r["total_s"]) == pytest.approx(
            sum(float(r[f"{s}_s"]) for s in budget_sweep.TIMED_STAGES)
        )
        assert report["config"]["search"]["num_samples"] == int(r["samples_per_source"])
        control = report["correction"].get("control")
        assert r["test_accuracy_control"] == (
            "" if control is None else str(control["test_accuracy"])
        )
    # Each point reused the trained models (and the source run's oracle) instead of training.
    record = json.load(open(os.path.join(out, "samples_16", "train", "stage.json")))
    assert record == json.load(open(os.path.join(source, "train", "stage.json")))
    assert os.path.getsize(os.path.join(out, "budget.png")) > 2000
    data = json.load(open(os.path.join(out, "budget.json")))
    assert data["samples"] == [16] and data["backend"] == "cpu" and len(data["rows"]) == 1

    # Bad input fails early with what to do.
    with pytest.raises(ValueError, match="inside the source run"):
        budget_sweep.run_budget_sweep(source, os.path.join(source, "x"), samples=[4])
    with pytest.raises(ValueError, match="given twice"):
        budget_sweep.check_samples([4, 4])
    with pytest.raises(ValueError, match="Pass --labeler source"):
        budget_sweep.run_budget_sweep(
            _manual_copy(source, tmp_path), str(tmp_path / "b2"), samples=[4]
        )
    assert budget_sweep.default_samples("cpu") == (10, 100, 1000)
    assert budget_sweep.default_samples("gpu") == (10, 100, 1000, 10_000)


def test_correction_trace_retraces_the_recorded_choice_and_counts_test_moves(
    finished, tmp_path, monkeypatch
):
    """scripts/correction_trace.py trains what the correction trained: its per-epoch scores are
    the ones selection.json recorded, its weight-0 trace is the report's control, and its test
    counts add up to its test accuracies."""
    import runpy
    import sys

    # Bounds that keep a fine-tuned epoch (TINY's tiny validation split keeps the original).
    loose = dataclasses.replace(
        TINY.correct, max_val_drop=1.0, max_region_drop=1.0, region_tolerance=0.0
    )
    source = _copy(finished[0], tmp_path)
    cache = os.path.join(source, "cache", "correct")
    (label_id,) = os.listdir(cache)  # keyed by the label stage's completion
    runs = _mtimes(os.path.join(cache, label_id))
    os.makedirs(os.path.join(cache, "an-earlier-label-stage"))
    logs = []
    pipeline.run(source, dataclasses.replace(TINY, correct=loose), log=logs.append)
    assert "[correct] configuration changed" in " ".join(logs)
    # Only the choice's bounds changed: it chose again from the region weight's finished run,
    # untouched, and the cache of a label stage that no longer stands is gone.
    assert os.listdir(cache) == [label_id]
    assert _mtimes(os.path.join(cache, label_id)) == runs
    before = _tree(source)
    selection = json.load(open(os.path.join(source, "correct", "classifier", "selection.json")))
    out = str(tmp_path / "trace.json")
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "correction_trace.py")
    argv = ["correction_trace.py", source, "--json", out, "--lams", "0.01", "0"]
    monkeypatch.setattr(sys, "argv", argv + ["--interpolate", "0", "1"])
    runpy.run_path(script, run_name="__main__")
    assert _tree(source) == before  # analysis only: the run is not touched

    trace, report = json.load(open(out)), _report(source)
    # alpha 0 interpolates all the way back: every epoch scores as the original classifier.
    back = [r for r in trace["records"] if r.pop("alpha") == 0.0]
    assert len(back) == 4 and len(trace["records"]) == 8
    for r in back:
        assert {k: r[k] for k in ("val_accuracy", "region_accuracy", "worst_region_drop")} == {
            k: trace["original"][k]
            for k in ("val_accuracy", "region_accuracy", "worst_region_drop")
        }
        assert r["test_accuracy"] == trace["test_accuracy"] and r["test_broken"] == 0
    trace["records"] = [r for r in trace["records"] if r not in back]
    assert trace["test_accuracy"] == report["test_accuracy_before"]
    assert trace["original"] == selection["original"]
    recorded = selection["per_lam"]["0.01"]  # TINY's one region weight, 2 epochs
    steps = [(r["lam"], r["epoch"]) for r in trace["records"]]
    assert steps == [(0.01, 1), (0.01, 2), (0.0, 1), (0.0, 2)]
    for r, e in zip(trace["records"][:2], recorded, strict=True):
        assert {k: r[k] for k in e} == e
        n_test = 200  # TINY's max_test
        moved = round((r["test_accuracy"] - trace["test_accuracy"]) * n_test)
        assert moved == r["test_fixed"] - r["test_broken"]
        assert len(set(r["test_broken_ids"])) == r["test_broken"]
        assert all(0 <= i < n_test for i in r["test_broken_ids"])
        if r["epoch"] == selection["chosen"]["epoch"]:
            assert r["test_accuracy"] == report["test_accuracy_after"]
    # Weight 0 is the report's control: the same fine-tuning without regions, for the kept epochs.
    control = report["correction"]["control"]
    assert not selection["kept_original"] and control["epochs"] == selection["chosen"]["epoch"]
    at_kept = trace["records"][2 + control["epochs"] - 1]
    assert at_kept["test_accuracy"] == control["test_accuracy"]
    assert os.path.isfile(os.path.join(source, "correct", "classifier", "control", "config.json"))
    shown = f"(control without regions: {report_lib.pct(control['test_accuracy'])})"
    assert any(line.startswith("evaluate: ") and shown in line for line in logs)
    # A run that kept the original classifier has no control; one that fine-tuned has one.
    kept = _report(finished[0])["correction"]
    assert (kept["control"] is None) == kept["selection"]["kept_original"]


def _manual_copy(source, tmp_path):
    """A copy of a run whose saved configuration has the manual labeler."""
    from defuse_jax.run_config import load_run_config

    run_dir = _copy(source, tmp_path / "manual")
    pipeline.save_run_config(
        run_dir, dataclasses.replace(load_run_config(run_dir), labeler="manual")
    )
    return run_dir


def test_the_mixture_takes_every_code_up_to_max_codes():
    """max_codes=None means 10,000 codes on a CPU and 200,000 on an accelerator; the distill
    stage reports how many codes its mixture was fitted on."""
    from defuse_jax.regions import codes_fitted, default_max_codes, resolved_max_codes

    assert default_max_codes("cpu") == 10_000 and default_max_codes("gpu") == 200_000
    assert resolved_max_codes(DistillConfig()) == default_max_codes()  # tests run on a CPU
    pred = np.repeat(np.arange(3), [30_000, 5, 1])
    assert codes_fitted(pred, DistillConfig()) == 10_000
    assert codes_fitted(pred, DistillConfig(max_codes=None, per_label=True, min_codes=5)) == 10_005
    assert codes_fitted(pred, DistillConfig(max_codes=200_000)) == 30_006


# --------------------------------------------------------------------------------------------
# The user's own classifier (`own_model`) through every stage.


# The own-model runs label by source class, without the oracle and the correction's control
# (they have their own tests), to keep them short.
OWN = dataclasses.replace(
    TINY,
    labeler="source",
    oracle_check=False,
    correct=dataclasses.replace(TINY.correct, control=False),
)


def _trained_models(run_dir):
    from defuse_jax.train_models import load_trained

    return tuple(load_trained(os.path.join(run_dir, "train", m))[0] for m in ("vae", "classifier"))


# What may differ between two runs of the same models: timings, where they ran, the config
# (which records how the models were given) and the models' identities.
_RUN_SPECIFIC = {"stage_seconds", "devices", "config", "own_models"}
_SEARCH_TIMES = {"wall_time_s", "compile_time_s", "search_time_s", "seconds"}


def test_the_projects_classifier_as_a_generic_pair_gives_the_same_report(finished, tmp_path):
    """Defuse through `(apply_fn, params)`, with the VAE as `(encode_fn, decode_fn, params)`,
    is the built-in path: same errors, regions, labels, correction and report. (A generic VAE
    encodes images alone, as TINY's unconditional one does.)"""
    from defuse_jax import models

    source = finished[0]
    vae, clf = _trained_models(source)
    run_dir = str(tmp_path / "pair")
    pipeline.run(
        run_dir, TINY, classifier=(models.logits, clf),
        vae=(models.encode, models.decode, vae), log=lambda s: None,
    )  # fmt: skip
    builtin, pair = _report(source), _report(run_dir)
    assert pair["own_models"]["classifier"]["kind"] == "function"
    assert pair["own_models"]["vae"]["kind"] == "function"
    for key in set(builtin) - _RUN_SPECIFIC:
        if key == "search":
            drop = lambda d: {k: v for k, v in d.items() if k not in _SEARCH_TIMES}  # noqa: E731
            assert drop(pair[key]) == drop(builtin[key])
        elif key == "correction":
            assert {**pair[key], "seconds": None} == {**builtin[key], "seconds": None}
        else:
            assert pair[key] == builtin[key], key
    np.testing.assert_array_equal(
        np.load(os.path.join(run_dir, "search", "errors.npz"))["z"],
        np.load(os.path.join(source, "search", "errors.npz"))["z"],
    )


def _train_linen_mlp(ds):
    """A linen MLP trained here, as a user would, outside the project."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen

    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.relu(linen.Dense(32)(x.reshape(x.shape[0], -1)))
            return linen.Dense(10)(x)

    model = MLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, *ds.image_shape)))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(v, s, x, y):
        loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y)  # noqa: E731
        with jax.numpy_dtype_promotion("standard"):  # optax's step counts (the suite: strict)
            updates, s = opt.update(jax.grad(lambda v: loss(v).mean())(v), s)
        return optax.apply_updates(v, updates), s

    state, rng = opt.init(variables), np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, len(ds.x_train), 32)
        variables, state = step(variables, state, ds.x_train[idx], ds.y_train[idx].astype(np.int32))
    return model, variables


def test_a_linen_classifier_goes_through_every_stage(trained, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    from defuse_jax import own_model
    from defuse_jax.data import load_dataset

    ds = load_dataset(TINY.data)
    model, variables = _train_linen_mlp(ds)
    original = jax.tree.map(np.array, variables)
    vae, _ = _trained_models(trained)
    own = own_model.as_classifier((model, variables), frozen="Dense_0")
    run_dir, logs = str(tmp_path / "linen"), []
    report = pipeline.run(run_dir, OWN, dataset=ds, classifier=own, vae=vae, log=logs.append)
    report = report["evaluate"]
    accuracy = float((model.apply(variables, ds.x_test).argmax(-1) == ds.y_test).mean())
    assert report["test_accuracy_before"] == pytest.approx(accuracy, abs=1e-6)
    assert report["num_regions_labeled"] >= 1 and not report["correction"]["skipped"]
    assert report["own_models"]["classifier"]["frozen"] == [
        "params/Dense_0/bias", "params/Dense_0/kernel"
    ]  # fmt: skip
    assert "your classifier" in open(os.path.join(run_dir, "report.md")).read()
    # The corrected weights, in the model's own structure: the frozen layer as it was, the user's
    # variables untouched, and the evaluate stage's corrected accuracy reproduced.
    corrected = ocp.StandardCheckpointer().restore(
        os.path.join(run_dir, "correct", "classifier", "own_params"), variables
    )
    jax.tree.map(np.testing.assert_array_equal, variables, original)
    np.testing.assert_array_equal(
        corrected["params"]["Dense_0"]["kernel"], original["params"]["Dense_0"]["kernel"]
    )
    after = float((model.apply(corrected, ds.x_test).argmax(-1) == ds.y_test).mean())
    assert report["test_accuracy_after"] == pytest.approx(after, abs=1e-6)
    # A rerun with the same model redoes nothing; one without it is refused; other weights
    # redo every stage.
    logs.clear()
    pipeline.run(run_dir, OWN, dataset=ds, classifier=own, vae=vae, log=logs.append)
    assert all(f"[{s}] done earlier, skipped" in logs for s in STAGES)
    with pytest.raises(ValueError, match="debugs with your classifier .* none was given"):
        pipeline.run(run_dir, OWN, dataset=ds, vae=vae, log=logs.append)
    other = jax.tree.map(lambda a: a * 1.01, variables)
    logs.clear()
    pipeline.run(run_dir, OWN, dataset=ds, classifier=(model, other), vae=vae, until="search",
                 log=logs.append)  # fmt: skip
    assert "[search] running" in logs and any("configuration changed" in s for s in logs)


NNX_MODELS = """
from flax import nnx


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8 * 16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.out(x.reshape(x.shape[0], -1))


def make():
    return Net(nnx.Rngs(0))
"""


def test_an_nnx_classifier_goes_through_every_stage_from_the_command_line(
    trained, tmp_path, monkeypatch
):
    """`defuse-jax run --classifier-fn mymodels:make --classifier-ckpt PATH` on an NNX conv
    net with batch norm, trained here and saved with Orbax."""
    import jax
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from defuse_jax import cli
    from defuse_jax.data import load_dataset

    (tmp_path / "mymodels.py").write_text(NNX_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "mymodels", raising=False)
    import mymodels

    ds = load_dataset(TINY.data)
    net = mymodels.make()
    opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt, x, y):
        def loss(net):
            return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()

        with jax.numpy_dtype_promotion("standard"):  # optax's step counts (the suite: strict)
            opt.update(net, nnx.grad(loss)(net))

    rng = np.random.default_rng(0)
    for _ in range(200):
        idx = rng.integers(0, len(ds.x_train), 32)
        step(net, opt, ds.x_train[idx], ds.y_train[idx].astype(np.int32))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(tmp_path / "ckpt"), nnx.state(net))
    net.eval()
    accuracy = float((net(ds.x_test).argmax(-1) == ds.y_test).mean())

    run_dir = str(tmp_path / "run")
    shutil.copytree(os.path.join(trained, "train", "vae"), os.path.join(run_dir, "train", "vae"))
    pipeline.save_run_config(run_dir, OWN)  # the tiny settings, as the CLI's defaults
    code = cli.main(["run", "--out", run_dir, "--classifier-fn", "mymodels:make",
                     "--classifier-ckpt", str(tmp_path / "ckpt")])  # fmt: skip
    assert code == 0
    report = _report(run_dir)
    assert report["own_models"]["classifier"]["name"] == "mymodels:make"
    assert set(report["own_models"]["classifier"]["frozen"]) == {"bn/mean", "bn/var"}
    assert report["test_accuracy_before"] == pytest.approx(accuracy, abs=1e-6)
    assert report["num_regions_labeled"] >= 1 and not report["correction"]["skipped"]
    # The README's two lines load the corrected weights back into the model.
    fresh = mymodels.make()
    path = os.path.join(run_dir, "correct", "classifier", "own_params")
    nnx.update(fresh, ocp.StandardCheckpointer().restore(path, nnx.state(fresh)))
    fresh.eval()
    after = float((fresh(ds.x_test).argmax(-1) == ds.y_test).mean())
    assert report["test_accuracy_after"] == pytest.approx(after, abs=1e-6)
    # Batch statistics are kept as they were.
    np.testing.assert_array_equal(np.asarray(fresh.bn.mean[...]), np.asarray(net.bn.mean[...]))
    # The entry point is remembered: a plain rerun finds every stage done, and the audit reads
    # the codes' predictions with the user's classifier, restored the same way.
    assert cli.main(["run", "--out", run_dir]) == 0
    assert cli.main(["audit", "--out", run_dir, "--codes", "4", "--known", "4"]) == 0
    from defuse_jax import yield_audit

    sample = yield_audit.read_audit(os.path.join(run_dir, "audit"))[0]
    known = ~sample.is_code
    np.testing.assert_array_equal(sample.pred[known], net(sample.images[known]).argmax(-1))


def test_the_audit_writes_blind_sheets_then_scores_the_answers(finished, tmp_path, capsys):
    """`defuse-jax audit`: sheets and a blank labels file, nothing scored while rows are empty,
    then the score of a person who reads every code as the classifier's prediction (all class
    changes) and every known image right; the labels file is never overwritten."""
    from defuse_jax import cli
    from defuse_jax import yield_audit as ya

    run_dir = _copy(finished[0], tmp_path)
    args = ["audit", "--out", run_dir, "--codes", "12", "--known", "6"]
    assert cli.main(args) == 0
    audit = os.path.join(run_dir, "audit")
    assert sorted(os.listdir(audit)) == ["key.npz", "labels.csv", "sheet_1.png"]
    sample, verdicts, names = ya.read_audit(audit)
    assert sample.is_code.sum() == 12 and (~sample.is_code).sum() == 6
    assert [k.split(" ")[0] for k in verdicts] == ["SVC"]  # 8x8 images: the SVC alone
    assert cli.main(args) == 3 and "18 of 18 images are not answered" in capsys.readouterr().err
    answers = np.where(sample.is_code, sample.pred, sample.truth)
    ya.write_labels_template(os.path.join(audit, "labels.csv"), 0)  # rewrite with answers:
    with open(os.path.join(audit, "labels.csv"), "a") as f:
        f.writelines(f"{i},{names[a]}\n" for i, a in enumerate(answers, 1))
    assert cli.main(args) == 0
    assert "person's bug yield: 0.0% (0/12" in capsys.readouterr().out
    score = json.load(open(os.path.join(audit, "score.json")))
    assert score["class_change"]["share"] == 1.0 and score["person_on_known"]["share"] == 1.0
    (name, svc), code = next(iter(score["judges"].items())), sample.is_code
    assert svc["bug"] == pytest.approx(np.mean(verdicts[name][code] == sample.truth[code]))
