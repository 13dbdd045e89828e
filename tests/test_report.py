"""Run report: report.json round trip, report.md content, plots and degenerate runs."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from defuse_jax import report as report_lib
from defuse_jax.report import ACCURACY_PLOT, PCA_PLOT, pca_2d, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = [str(i) for i in range(10)]
REQUIRED = (
    "dataset",
    "num_sources",
    "num_samples_evaluated",
    "num_errors_found",
    "num_regions",
    "num_regions_labeled",
    "test_accuracy_before",
    "test_accuracy_after",
    "region_accuracy_before",
    "region_accuracy_after",
    "regions",
    "stage_seconds",
)


def _region(
    rid,
    num_codes,
    src,
    pred,
    *,
    label=None,
    skipped=False,
    before=None,
    after=None,
    oracle=None,
    top_pair=None,
):
    counts_src = [0] * 10
    counts_src[src] = num_codes
    counts_pred = [0] * 10
    counts_pred[pred] = num_codes
    return {
        "id": rid,
        "num_codes": num_codes,
        "weight": num_codes / 200,
        "majority_source_label": src,
        "majority_pred_label": pred,
        "source_label_counts": counts_src,
        "pred_label_counts": counts_pred,
        "error_rate": 0.875 if not skipped else None,
        "top_pair": top_pair,  # None: a run from before it was recorded
        "purity": 0.75,
        "error_region": True,
        "label": label,
        "label_name": None if label is None else NAMES[label],
        "skipped": skipped,
        "accuracy_before": before,
        "accuracy_after": after,
        "oracle_label": None if oracle is None else oracle[0],
        "oracle_agreement": None if oracle is None else oracle[1],
        "ambiguous": oracle is not None and oracle[1] < 0.5,
        "grid": f"label/region_{rid:03d}.png",
    }


def _report(**overrides):
    regions = [
        _region(3, 120, 6, 1, label=6, before=0.125, after=0.9375, oracle=(6, 0.875)),
        _region(0, 50, 4, 9, skipped=True, top_pair=[5, 9]),  # 4 -> 9: the two majorities
        # labeled, but no held-out accuracy; the oracle mostly says 7: ambiguous
        _region(7, 30, 2, 7, label=2, oracle=(7, 0.25)),
    ]
    report = {
        "dataset": "digits",
        "class_names": NAMES,
        "num_sources": 360,
        "num_sources_used": 350,
        "num_sources_skipped": 10,
        "num_samples_evaluated": 35000,
        "num_errors_found": 200,
        "num_flips": 1234,
        "num_regions": 3,
        "num_regions_labeled": 2,
        "num_regions_skipped": 1,
        "test_accuracy_before": 0.95,
        "test_accuracy_after": 0.9444,
        "region_accuracy_before": 0.125,
        "region_accuracy_after": 0.9375,
        "error_code_accuracy_before": 0.0,
        "error_code_accuracy_after": 0.81,
        "num_error_codes_labeled": 1234,
        "oracle_agreement": 0.5625,
        "oracle_test_accuracy": 0.98,
        "oracle_members": 3,
        "num_ambiguous_regions": 1,
        "regions": regions,
        "correction": {"skipped": False, "reason": None, "lam": 0.01, "epochs": 3, "seconds": 4.5},
        "stage_seconds": {
            "evaluate": 1.0,
            "train": 10.0,
            "search": 2.5,
            "distill": 0.5,
            "label": 0.1,
            "correct": 4.5,
        },
        "search": {
            "num_samples_evaluated": 35000,
            "wall_time_s": 2.4,
            "config": {"mode": "sample", "num_samples": 100},
        },
        "devices": {"backend": "cpu", "devices": ["TFRT_CPU_0", "TFRT_CPU_1"]},
        "messages": ["Region 0 was skipped by the labeler."],
        "config": {"search": {"scale": 1.0}, "correct": {"lam": 0.01}},
    }
    report.update(overrides)
    return report


def _codes(m, rng_seed=0, num_regions=3):
    rng = np.random.default_rng(rng_seed)
    codes = rng.normal(size=(m, 8)).astype(np.float32)
    assignment = rng.integers(-1, num_regions, size=m).astype(np.int32)
    ids = np.array([3, 0, 7])
    assignment = np.where(assignment >= 0, ids[np.maximum(assignment, 0)], -1).astype(np.int32)
    return codes, assignment


def _assert_png(path):
    assert os.path.isfile(path)
    assert os.path.getsize(path) > 2000  # a real figure, not an empty stub
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def _read(paths):
    with open(paths["json"], encoding="utf-8") as f:
        data = json.load(f)
    with open(paths["markdown"], encoding="utf-8") as f:
        md = f.read()
    return data, md


def test_full_report(tmp_path):
    run_dir = str(tmp_path / "run")
    report = _report()
    original = copy.deepcopy(report)
    codes, assignment = _codes(200)
    paths = write_report(run_dir, report, codes=codes, assignment=assignment)

    assert report == original  # the caller's dict is not modified
    assert set(paths) == {"json", "markdown", "latent_pca", "region_accuracy"}
    assert paths["json"] == os.path.join(run_dir, "report.json")
    assert paths["markdown"] == os.path.join(run_dir, "report.md")
    _assert_png(paths["latent_pca"])
    _assert_png(paths["region_accuracy"])
    assert paths["latent_pca"] == os.path.join(run_dir, PCA_PLOT)
    # No temp files are left behind by the atomic writes.
    leftovers = [n for _, _, fs in os.walk(run_dir) for n in fs if n.endswith(".tmp")]
    assert leftovers == []

    data, md = _read(paths)
    for key in REQUIRED:
        assert key in data
    assert data["plots"] == {"latent_pca": PCA_PLOT, "region_accuracy": ACCURACY_PLOT}
    assert {k: v for k, v in data.items() if k != "plots"} == original
    with open(paths["json"], encoding="utf-8") as f:
        text = f.read()
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"

    assert md.startswith("# Defuse report: digits")
    assert "350 of 360 source points" in md and "35,000 samples" in md
    assert "200 error codes" in md and "2 labeled, 1 skipped" in md
    assert "- Region 0 was skipped by the labeler." in md
    # Before/after table with percentages and percentage-point changes.
    assert "| Test accuracy | 95.0% | 94.4% | -0.6 pp |" in md
    assert "| Region accuracy (held-out region samples) | 12.5% | 93.8% | +81.2 pp |" in md
    assert (
        "| Accuracy on the 1,234 found error codes in labeled regions (by the region's label) "
        "| 0.0% | 81.0% | +81.0 pp |"
    ) in md
    # Per-region rows, in the given order, with class names, labels and accuracies.
    assert "| 3 | 120 | 0.600 | 6 -> 1 | 75.0% | 87.5% | 6 | 87.5% | n/a | 12.5% -> 93.8% |" in md
    # The tables say what their two rates are measured against.
    assert "*Error rate*: the share of fresh region samples the classifier does not call" in md
    # The pair purity counts, not the majorities side by side (older runs: those).
    assert "| 0 | 50 | 0.250 | 5 -> 9 | 75.0% | n/a | skipped | n/a | n/a | n/a |" in md
    assert (
        "| 7 | 30 | 0.150 | 2 -> 7 | 75.0% | 87.5% | 2 | 25.0% **ambiguous** (says 7) "
        "| n/a | n/a -> n/a |" in md
    )
    # Label validity: the oracle's mean agreement, its test accuracy and the ambiguous regions.
    assert (
        "the oracle (3 classifiers, trained separately, test accuracy 98.0%) agrees with the "
        "region labels on 56.2%" in md
    )
    assert "**1 ambiguous labeled region** (it disagrees on most of their samples): region 7." in md
    assert md.index("| 3 | 120") < md.index("| 0 | 50") < md.index("| 7 | 30")
    for rid in (3, 0, 7):
        assert f"![region {rid}](label/region_{rid:03d}.png)" in md
    assert f"]({PCA_PLOT})" in md and f"]({ACCURACY_PLOT})" in md
    assert "lambda = 0.01" in md
    # Stage timings in pipeline order, with a total.
    assert md.index("| train |") < md.index("| search |") < md.index("| evaluate |")
    assert "| **total** | **18.6** |" in md
    assert f"defuse-jax label --out {run_dir} --labeler manual" in md
    assert f"defuse-jax run --out {run_dir}" in md


def test_rewrite_is_idempotent_and_handles_numpy_and_nan(tmp_path):
    run_dir = str(tmp_path)
    codes, assignment = _codes(50)
    report = _report(
        num_errors_found=np.int64(50),
        test_accuracy_after=np.float32(0.5),
        error_code_accuracy_after=float("nan"),
    )
    first, _ = _read(write_report(run_dir, report, codes=codes, assignment=assignment))
    second, md = _read(write_report(run_dir, report, codes=codes, assignment=assignment))
    assert first == second
    assert first["num_errors_found"] == 50 and first["test_accuracy_after"] == 0.5
    assert first["error_code_accuracy_after"] is None  # NaN is not valid JSON
    assert (
        "| Accuracy on the 1,234 found error codes in labeled regions (by the region's label) "
        "| 0.0% | n/a | n/a |"
    ) in md
    # A later report without plots (e.g. a rerun that found nothing) removes the stale ones.
    paths = write_report(
        run_dir,
        _report(regions=[], region_accuracy_before=None),
        codes=codes[:2],
        assignment=assignment[:2],
    )
    assert set(paths) == {"json", "markdown"}
    assert not os.path.exists(os.path.join(run_dir, PCA_PLOT))
    assert not os.path.exists(os.path.join(run_dir, ACCURACY_PLOT))


def test_zero_errors(tmp_path):
    report = _report(
        num_errors_found=0,
        num_flips=0,
        num_regions=0,
        num_regions_labeled=0,
        num_regions_skipped=0,
        regions=[],
        region_accuracy_before=None,
        region_accuracy_after=None,
        error_code_accuracy_before=None,
        error_code_accuracy_after=None,
        test_accuracy_after=0.95,
        correction={
            "skipped": True,
            "reason": "no labeled region",
            "lam": 0.01,
            "epochs": 0,
            "seconds": None,
        },
        messages=["The search found no errors; try a larger perturbation scale."],
    )
    paths = write_report(
        str(tmp_path),
        report,
        codes=np.zeros((0, 8), np.float32),
        assignment=np.zeros((0,), np.int32),
    )
    assert set(paths) == {"json", "markdown"}
    assert not os.path.exists(tmp_path / "plots")
    data, md = _read(paths)
    assert data["plots"] == {} and data["regions"] == []
    assert "No errors were found" in md
    assert "The search found no errors; try a larger perturbation scale." in md
    assert "No misclassification regions." in md
    assert "Correction was skipped: no labeled region." in md
    assert "| Region accuracy (held-out region samples) | n/a | n/a | n/a |" in md
    assert "| Test accuracy | 95.0% | 95.0% | +0.0 pp |" in md
    assert "![" not in md


def test_errors_but_zero_regions(tmp_path):
    codes = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    report = _report(
        num_regions=0,
        num_regions_labeled=0,
        num_regions_skipped=0,
        regions=[],
        num_errors_found=5,
        region_accuracy_before=None,
        region_accuracy_after=None,
    )
    paths = write_report(str(tmp_path), report, codes=codes, assignment=np.full((5,), -1, np.int32))
    assert set(paths) == {"json", "markdown", "latent_pca"}  # all-grey scatter still drawn
    _assert_png(paths["latent_pca"])
    _, md = _read(paths)
    assert "kept **no region**" in md
    assert "No misclassification regions." in md


def test_no_labeled_regions(tmp_path):
    regions = [_region(1, 40, 3, 5, skipped=True), _region(2, 20, 8, 3)]  # skipped, unanswered
    report = _report(
        regions=regions,
        num_regions=2,
        num_regions_labeled=0,
        num_regions_skipped=1,
        region_accuracy_before=None,
        region_accuracy_after=None,
        correction={
            "skipped": True,
            "reason": "every region was skipped",
            "lam": 0.01,
            "epochs": 0,
            "seconds": None,
        },
    )
    codes, assignment = _codes(2)  # M < 3: no PCA plot either
    paths = write_report(str(tmp_path), report, codes=codes, assignment=assignment)
    assert set(paths) == {"json", "markdown"}
    data, md = _read(paths)
    assert data["plots"] == {}
    assert "**No region is labeled**" in md
    assert "Correction was skipped: every region was skipped." in md
    assert "| 1 | 40 | 0.200 | 3 -> 5 | 75.0% | n/a | skipped | n/a |" in md
    assert "| 2 | 20 | 0.100 | 8 -> 3 | 75.0% | 87.5% | unlabeled | n/a |" in md
    assert "## Plots" not in md


def test_class_names_and_missing_grid(tmp_path):
    names = ["not|smiling", "smiling"]
    region = _region(0, 10, 0, 1, label=0, before=0.0, after=1.0)
    region.update(
        source_label_counts=[10, 0], pred_label_counts=[0, 10], label_name=names[0], grid=None
    )
    report = _report(
        class_names=names,
        regions=[region],
        num_regions=1,
        num_regions_labeled=1,
        num_regions_skipped=0,
    )
    codes = np.random.default_rng(2).normal(size=(10, 1)).astype(np.float32)  # L = 1
    paths = write_report(str(tmp_path), report, codes=codes, assignment=np.zeros(10, np.int32))
    _assert_png(paths["latent_pca"])
    _assert_png(paths["region_accuracy"])
    _, md = _read(paths)
    row = (
        "| 0 | 10 | 0.050 | not\\|smiling -> smiling | 75.0% | 87.5% | not\\|smiling "
        "| n/a | n/a | 0.0% -> 100.0% |"
    )
    assert row in md
    assert "![region 0]" not in md


def test_labeled_regions_without_accuracy_skip_the_bar_chart(tmp_path):
    report = _report(
        regions=[_region(7, 30, 2, 7, label=2)],
        num_regions=1,
        num_regions_labeled=1,
        num_regions_skipped=0,
        region_accuracy_before=None,
        region_accuracy_after=None,
    )
    codes, assignment = _codes(30, num_regions=1)
    paths = write_report(str(tmp_path), report, codes=codes, assignment=assignment)
    assert "region_accuracy" not in paths and "latent_pca" in paths
    assert not os.path.exists(tmp_path / ACCURACY_PLOT)


def test_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="assignment"):
        write_report(
            str(tmp_path),
            _report(),
            codes=np.zeros((4, 2), np.float32),
            assignment=np.zeros(3, np.int32),
        )
    with pytest.raises(ValueError, match="codes"):
        write_report(
            str(tmp_path),
            _report(),
            codes=np.zeros(4, np.float32),
            assignment=np.zeros(4, np.int32),
        )


def test_pca_2d():
    rng = np.random.default_rng(0)
    # Variance mostly along one axis: PC 1 explains most of it.
    codes = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])
    proj, explained = pca_2d(codes)
    assert proj.shape == (500, 2)
    np.testing.assert_allclose(proj.mean(axis=0), 0.0, atol=1e-9)
    assert explained[0] > 0.95 and explained[0] > explained[1] > 0
    np.testing.assert_allclose(
        np.abs(proj[:, 0]), np.abs(codes[:, 0] - codes[:, 0].mean()), rtol=0.05, atol=0.5
    )
    proj1, explained1 = pca_2d(rng.normal(size=(5, 1)))
    assert proj1.shape == (5, 2) and np.all(proj1[:, 1] == 0) and explained1[1] == 0


def test_regions_below_the_error_threshold_are_listed_apart(tmp_path):
    """Every region not an error region: listed apart, counted, and the report still renders."""
    quiet = [{**_region(rid, n, 4, 4), "error_rate": 0.1, "error_region": False}
             for rid, n in ((1, 40), (2, 20))]  # fmt: skip
    report = _report(
        regions=quiet, num_regions=2, num_non_error_regions=2, num_codes_in_non_error_regions=60,
        num_regions_labeled=0, num_regions_skipped=0, region_accuracy_before=None,
        region_accuracy_after=None,
    )  # fmt: skip
    codes, assignment = _codes(2)
    _, md = _read(write_report(str(tmp_path), report, codes=codes, assignment=assignment))
    assert "2 regions (60 error codes) are **not error regions**" in md
    assert "**Error regions**" not in md
    assert md.index("**Not error regions") < md.index("| 1 | 40 | 0.200 | 4 -> 4 |")
    assert "| 75.0% | 10.0% | not an error region | n/a |" in md
    assert "| Test accuracy | 95.0% | 94.4% | -0.6 pp |" in md  # still evaluated


def _assemble(per_before, per_after, *, answers, confirmed, overlap=None):
    from defuse_jax.report import assemble

    records = [_region(rid, 10 * (rid + 1), 4, 9) for rid in sorted(answers)]
    search = {k: 1 for k in ("num_sources", "num_sources_used", "num_sources_skipped",
                             "num_samples_evaluated", "num_errors_found", "num_flips")}  # fmt: skip
    ev = lambda per: {"test_accuracy": 0.9, "region_accuracy": None, "per_region": per,  # noqa: E731
                      "error_code_accuracy": None, "num_error_codes_labeled": 0}  # fmt: skip
    return assemble(
        dataset="digits", class_names=NAMES, search=search, region_records=records,
        answers=answers, before=ev(per_before), after=ev(per_after),
        correction={"skipped": False, "reason": None, "lam": 0.01, "epochs": 1,
                    "resolve_overlap": True, "seconds": 1.0},
        stage_seconds={}, devices={}, messages=[], config={}, confirmed=confirmed,
        overlap=overlap,
    )  # fmt: skip


def test_regions_that_end_worse_are_named(tmp_path):
    report = _assemble(
        {0: 0.10, 1: 0.60, 2: 0.30}, {0: 0.96, 1: 0.54, 2: 0.26},
        answers={0: 4, 1: 4, 2: 4}, confirmed=[0, 2],
    )  # fmt: skip
    assert report["regions_worse_after"] == [1]  # -6 pt; region 2's -4 pt is within the bound
    assert report["num_regions_confirmed"] == 2
    assert [r["confirmed_error"] for r in report["regions"]] == [True, False, True]
    _, md = _read(write_report(str(tmp_path), report, codes=np.zeros((0, 2)),
                               assignment=np.zeros(0, np.int32)))  # fmt: skip
    assert "**1 labeled regions ended more than 5% worse than they started** (1)." in md
    assert "1 labeled regions got the label the classifier already predicts" in md
    assert md.index("**Labeled as the classifier predicts") < md.index("| 1 | 20 |")


@pytest.mark.parametrize(
    "confirmed, scope, needle",
    [
        ([0], "confirmed", "| Region accuracy (confirmed error regions) |"),
        ([], "labeled", "no labeled region is a confirmed error, so region accuracy covers every"),
    ],
)
def test_region_accuracy_says_which_regions_it_covers(tmp_path, confirmed, scope, needle):
    report = _assemble(
        {0: 0.1, 1: 0.9}, {0: 1.0, 1: 1.0}, answers={0: 4, 1: 4}, confirmed=confirmed
    )
    assert report["region_accuracy_scope"] == scope
    _, md = _read(write_report(str(tmp_path), report, codes=np.zeros((0, 2)),
                               assignment=np.zeros(0, np.int32)))  # fmt: skip
    assert needle in md


def test_overlapping_regions_are_reported(tmp_path):
    overlap = {0: {"contested": 0.4, "overlaps": {1: 0.4}}, 1: {"contested": 0.5,
               "overlaps": {0: 0.5}}, 2: {"contested": 0.0, "overlaps": {}}}  # fmt: skip
    report = _assemble(
        {0: 0.1, 1: 0.1, 2: 0.1}, {0: 0.9, 1: 0.9, 2: 0.9},
        answers={0: 4, 1: 5, 2: 6}, confirmed=[0, 1, 2], overlap=overlap,
    )  # fmt: skip
    assert [r["overlaps_with"] for r in report["regions"]] == [[1], [0], []]
    assert [r["contested"] for r in report["regions"]] == [0.4, 0.5, 0.0]
    _, md = _read(write_report(str(tmp_path), report, codes=np.zeros((0, 2)),
                               assignment=np.zeros(0, np.int32)))  # fmt: skip
    assert "2 labeled regions overlap regions of another label (0, 1)" in md
    assert "| 40.0% contested (with 1) |" in md and "| none |" in md


_SELECTION = {
    "chosen": {
        "lam": 0.003,
        "epoch": 7,
        "val_accuracy": 0.97,
        "region_accuracy": 0.99,
        "shifted_broken": 1234,
    },  # fmt: skip
    "original": {"lam": 0.0, "epoch": 0, "val_accuracy": 0.975, "region_accuracy": 0.3},
    "kept_original": False,
    "watched_regions": [1, 4],
    "num_val": 202,
    "per_lam": {"0.001": [], "0.003": [], "0.01": []},
}


@pytest.mark.parametrize(
    "validity, needle",
    [("none", "(`--search-validity none`, the paper's)"),
     ("oracle", "only samples the oracle still reads as the source class")],
)  # fmt: skip
def test_the_report_gives_the_bug_yield_and_says_what_steered_the_search(validity, needle):
    found = {"judge": "SVC (RBF kernel, C=10) on 1,145 training images' pixels",
             "judge_test_accuracy": 0.991, "codes_judged": 3291, "bug": 0.112,
             "class_change": 0.814}  # fmt: skip
    lines = report_lib.markdown._bug_yield_lines(
        {"bug_yield": found, "search": {"config": {"validity": validity}}}
    )
    text = " ".join(lines)
    assert "of 3,291 kept error codes, the judge reads **11.2% as their source class**" in text
    assert "81.4% as the class the classifier predicts" in text and "(test accuracy 99.1%)" in text
    assert needle in text
    assert "For scale" not in text  # an older run, without the judge's reading of test errors
    scaled = report_lib.markdown._bug_yield_lines(
        {"bug_yield": {**found, "test_errors": 297, "test_error_yield": 0.313},
         "search": {"config": {"validity": validity}}}
    )  # fmt: skip
    assert ("the classifier gets 297 test images wrong, bugs by their labels, and the judge reads "
            "31.3% of them as their true class") in " ".join(scaled)  # fmt: skip
    assert "--vae-conditional" not in text
    conditional = report_lib.markdown._bug_yield_lines(
        {"bug_yield": found, "search": {"config": {"validity": validity}},
         "config": {"vae": {"kind": "mlp", "conditional": True}}}
    )  # fmt: skip
    assert "its VAE decodes from the source class (`--vae-conditional`)" in " ".join(conditional)
    assert "candidates" not in text  # an older run, or a single candidate: no table of judges
    svc = {"judge": "SVC", "test_accuracy": 0.98, "on_right": 0.99, "on_wrong": 0.5,
           "balanced": 0.745, "bug": 0.613, "chosen": True}  # fmt: skip
    conv = {**svc, "judge": "conv", "on_wrong": 0.2, "balanced": 0.595, "bug": 0.479,
            "chosen": False}  # fmt: skip
    searched = {"config": {"validity": validity}}
    both = " ".join(report_lib.markdown._bug_yield_lines(
        {"bug_yield": {**found, "judges": [svc, conv]}, "search": searched}
    ))  # fmt: skip
    assert "The judge was chosen among 2 candidates" in both
    assert ("SVC (chosen): 99.0% of the images the classifier gets right and 50.0% of its "
            "errors, so 74.5%, and a bug yield of 61.3%; conv: ") in both  # fmt: skip
    assert "The candidates read a bug yield between 47.9% and 61.3%" in both
    alone = {**found, "judges": [svc]}
    assert "candidates" not in " ".join(report_lib.markdown._bug_yield_lines(
        {"bug_yield": alone, "search": searched}
    ))  # fmt: skip


@pytest.mark.parametrize(
    "selection, needles",
    [
        (None, ["for 20 epochs with lambda = 0.01", "keeping the last epoch"]),
        (
            _SELECTION,
            [
                "tried lambda in {0.001, 0.003, 0.01}",
                "**lambda = 0.003, epoch 7**",
                "97.5% -> 97.0% on 202 validation images",
                "2 watched regions 30.0% -> 99.0%",
                "the one that breaks the fewest shifted training images (1,234)",
            ],
        ),  # fmt: skip
        (
            {**_SELECTION, "kept_original": True},
            ["no epoch both stayed within the", "**the original classifier is kept**"],
        ),
        (
            {**_SELECTION, "given_up": [{"region": 6, "before": 1.0, "after": 0.42}]},
            [
                "**1 labeled region could not be held**",
                "broke it",
                "6 (100.0% -> 42.0%)",
                "it was given up rather than the whole correction",
            ],
        ),  # fmt: skip
    ],
)
def test_the_report_says_how_the_corrected_model_was_chosen(selection, needles):
    corr = {"skipped": False, "reason": None, "lam": 0.01, "epochs": 20, "seconds": 3.0,
            "resolve_overlap": True, "selection": selection}  # fmt: skip
    text = report_lib.correction_summary({"correction": corr})
    for needle in needles:
        assert needle in text


@pytest.mark.parametrize(
    "control, needles, absent",
    [
        (None, [], "Control:"),
        (
            {"epochs": 7, "test_accuracy": 0.972, "region_accuracy": 0.55},
            [
                "same fine-tuning (7 epochs, same seed and batches)",
                "test accuracy 98.0% -> 97.2% (-0.8 pp, against -0.4 pp with the regions)",
                "region accuracy 30.0% -> 55.0% (against 99.0%)",
            ],
            None,
        ),  # fmt: skip
    ],
)
def test_the_report_sets_the_correction_next_to_its_control(control, needles, absent):
    corr = {"skipped": False, "reason": None, "lam": 0.003, "epochs": 7, "seconds": 3.0,
            "resolve_overlap": True, "selection": _SELECTION, "control": control}  # fmt: skip
    report = {"correction": corr, "test_accuracy_before": 0.98, "test_accuracy_after": 0.976,
              "region_accuracy_before": 0.3, "region_accuracy_after": 0.99}  # fmt: skip
    text = report_lib.correction_summary(report)
    for needle in needles:
        assert needle in text
    assert absent is None or absent not in text


@pytest.mark.parametrize(
    "validity, who",
    [("none", "skipped because the classifier already"),
     ("oracle", "skipped because the classifier or the oracle (the validity model) already")],
)  # fmt: skip
def test_the_summary_names_who_skipped_the_sources(validity, who):
    report = {"num_errors_found": 0, "num_sources_used": 90, "num_sources": 100,
              "num_sources_skipped": 10, "num_samples_evaluated": 9000, "num_flips": 0,
              "regions": [], "search": {"config": {"validity": validity}}}  # fmt: skip
    assert who in " ".join(report_lib.markdown._summary_lines(report))


@pytest.mark.parametrize(
    "agreement, confirmed, backed",
    [
        ({1: 0.9, 2: 0.2, 3: 0.7}, [1, 2], 1),  # region 3 is backed but not confirmed
        ({1: 0.5, 2: 0.49}, [1, 2], 1),  # at least half backs a label
        ({}, [1], 0),
    ],  # fmt: skip
)
def test_the_judge_backs_the_confirmed_regions_whose_samples_it_reads_as_their_label(
    agreement, confirmed, backed
):
    found = {"judge": "SVC", "judge_test_accuracy": 0.99, "codes_judged": 10, "bug": 0.6,
             "class_change": 0.3, "per_region": {}, "label_agreement": agreement}  # fmt: skip
    out = report_lib.assembly._bug_yield(found, confirmed)
    assert out["confirmed_judge_agrees"] == backed and "label_agreement" not in out
    text = " ".join(report_lib.markdown._judge_agrees_line(out, len(confirmed)))
    assert f"of {backed} of the {len(confirmed)} confirmed error regions" in text
    # an older run's figures: no second opinion, and no line
    older = report_lib.assembly._bug_yield({k: found[k] for k in found if k != "label_agreement"},
                                           confirmed)  # fmt: skip
    assert "confirmed_judge_agrees" not in older
    assert report_lib.markdown._judge_agrees_line(older, len(confirmed)) == []


@pytest.mark.parametrize(
    "on_errors, reading, warned",
    [
        (None, None, False),  # an older report, or no error to read
        (0.8, "test accuracy 98.0%, reads 80.0% of the classifier's test errors as their label)",
         False),
        (0.25, "reads 25.0% of the classifier's test errors as their label)", True),
    ],
)  # fmt: skip
def test_the_report_says_how_much_of_the_classifiers_errors_the_oracle_reads(
    tmp_path, on_errors, reading, warned
):
    extra = {} if on_errors is None else {"oracle_on_test_errors": on_errors}
    codes, assignment = _codes(40)
    write_report(str(tmp_path), _report(**extra), codes=codes, assignment=assignment)
    md = open(os.path.join(str(tmp_path), "report.md")).read()
    if reading is None:
        assert "test accuracy 98.0%) agrees with the region labels" in md
    else:
        assert reading in md
    assert ("it shares the classifier's blind spots" in md) == warned
