"""End-to-end Defuse on a tiny digits config: report, resume, invalidation and failure paths."""

import dataclasses
import json
import os
import shutil

import pytest

from defuse_jax import labeling, pipeline
from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.regions import DistillConfig
from defuse_jax.run_config import DEFAULT_SEARCH, RunConfig
from defuse_jax.training import TrainConfig

TINY = RunConfig(
    data=DataConfig(max_train=600, max_test=200),
    vae_train=TrainConfig(epochs=15, batch_size=32, learning_rate=2e-3),
    classifier_train=TrainConfig(epochs=6, batch_size=32, learning_rate=2e-3),
    max_sources=80,
    search=dataclasses.replace(DEFAULT_SEARCH, num_samples=64, chunk_size=1024),
    distill=DistillConfig(n_components=8, max_iter=100, min_codes=5, error_samples=32),
    grid_samples=4,
    correct=CorrectConfig(epochs=2, batch_size=32),
    progress=False,
)
REQUIRED_KEYS = (
    "dataset", "num_sources", "num_samples_evaluated", "num_errors_found", "num_regions",
    "num_regions_labeled", "test_accuracy_before", "test_accuracy_after",
    "region_accuracy_before", "region_accuracy_after", "regions", "stage_seconds",
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with the (slow) train stage done, copied by each test."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    pipeline.run(run_dir, TINY, until="train", log=lambda s: None)
    return run_dir


def _copy(trained, tmp_path):
    dest = str(tmp_path / "run")
    shutil.copytree(trained, dest)
    return dest


def _report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def test_full_run_report_and_resume(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    logs = []
    pipeline.run(run_dir, TINY, log=logs.append)
    assert "[train] done earlier, skipped" in logs
    report = _report(run_dir)
    for key in REQUIRED_KEYS:
        assert key in report, key
    assert report["num_errors_found"] > 0 and report["num_regions"] >= 1
    assert report["num_regions_labeled"] == report["num_regions"]  # source labeler
    for key in ("test_accuracy_before", "test_accuracy_after", "region_accuracy_before",
                "region_accuracy_after"):  # fmt: skip
        assert 0.0 <= report[key] <= 1.0
    assert set(report["stage_seconds"]) >= {"train", "search", "distill", "label", "correct"}
    for rec in report["regions"]:
        assert os.path.exists(os.path.join(run_dir, rec["grid"]))
        assert rec["accuracy_before"] is not None and rec["accuracy_after"] is not None
    assert os.path.exists(os.path.join(run_dir, "report.md"))
    assert os.path.exists(os.path.join(run_dir, "plots", "latent_pca.png"))
    labels = labeling.read_labels(
        os.path.join(run_dir, "label", "labels.csv"),
        region_ids=[r["id"] for r in report["regions"]],
        class_names=report["class_names"],
    )
    assert labels == {r["id"]: r["majority_source_label"] for r in report["regions"]}

    # The same command again redoes nothing.
    logs.clear()
    pipeline.run(run_dir, TINY, log=logs.append)
    assert all("done earlier" in line for line in logs), logs

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


def test_interrupted_run_resumes_without_redoing_finished_stages(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    pipeline.run(run_dir, TINY, until="search", log=lambda s: None)
    errors_mtime = os.path.getmtime(os.path.join(run_dir, "search", "errors.npz"))
    logs = []
    pipeline.run(run_dir, TINY, log=logs.append)
    assert "[search] done earlier, skipped" in logs and "[evaluate] running" in logs
    assert os.path.getmtime(os.path.join(run_dir, "search", "errors.npz")) == errors_mtime


def test_no_errors_found_gives_a_clear_report(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    tiny_scale = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, scale=1e-6))
    logs = []
    pipeline.run(run_dir, tiny_scale, log=logs.append)
    report = _report(run_dir)
    assert report["num_errors_found"] == 0 and report["num_regions"] == 0
    assert report["region_accuracy_before"] is None and report["correction"]["skipped"]
    assert any("no errors" in m for m in report["messages"])
    assert report["test_accuracy_after"] == report["test_accuracy_before"]
    assert any("too few to distill" in line for line in logs)


def test_manual_labels_all_skipped_skips_correction(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    manual = dataclasses.replace(TINY, labeler="manual")
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
    assert (
        report["num_regions_labeled"] == 0
        and report["num_regions_skipped"] == report["num_regions"]
    )
    assert report["correction"]["skipped"] and report["region_accuracy_after"] is None
    # The person's answers survive a rerun of the label stage.
    labels = labeling.read_labels(
        path, region_ids=[r["id"] for r in report["regions"]], class_names=report["class_names"]
    )
    assert labels == answers
