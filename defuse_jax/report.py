"""Run report: its schema (`Report`), ``report.json``, ``report.md`` and summary plots.

`Report` is the stable schema of ``report.json`` (a TypedDict: the file is plain JSON, the keys
and their meaning are fixed here). :func:`assemble` builds one from a run's evaluated numbers;
:func:`write_report` stores it unchanged (plus the plot paths) as ``report.json``, renders the
human summary
``report.md`` a person debugging the model reads first, and draws two plots under ``plots/``:

* ``latent_pca.png``: the error codes projected on their first two principal components,
  coloured by region (skipped when fewer than 3 codes);
* ``region_accuracy.png``: accuracy before/after correction per labeled region (skipped when no
  labeled region has an accuracy).

All paths inside the report are relative to the run directory, so the directory can be moved or
rendered as Markdown anywhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, NotRequired, TypedDict

import numpy as np

from defuse_jax import label_validity
from defuse_jax.files import atomic_write, make_dirs, remove
from defuse_jax.plots import plt, save_figure
from defuse_jax.regions import top_pair
from defuse_jax.run_config import STAGES
from defuse_jax.run_dir import LABELS_FILE, RunDir

WORSE_BY: Final = 0.05  # a region "ends worse" when its accuracy falls by more than this


class RegionReport(TypedDict):
    """One misclassification region (`Report.regions`, largest first)."""

    id: int  # region index, as in distill/regions.json and labels.csv
    num_codes: int  # error codes assigned to the region
    weight: float  # mixture weight of the whole error set
    source_label_counts: list[int]  # [C] true labels of the codes' source points
    pred_label_counts: list[int]  # [C] the classifier's predictions on the codes
    majority_source_label: int
    majority_pred_label: int
    error_rate: float | None  # share of fresh region samples not classified as the majority
    top_pair: list[int] | None  # [2] its most common (source, predicted) pair (None: older run)
    purity: float  # share of its codes with that pair
    error_region: bool  # error_rate >= the distill stage's min_error_rate (else not offered)
    label: int | None  # the region's label (None: skipped or unlabeled)
    label_name: str | None
    skipped: bool  # the labeler rejected the region
    accuracy_before: float | None  # on held-out region samples (labeled regions only)
    accuracy_after: float | None
    # labeled regions: the classifier errs on at least min_error_rate of the held-out samples
    # under the region's label (counted in region accuracy); False: the labeler sided with the
    # classifier, so the region is no bug; None: not labeled
    confirmed_error: bool | None
    contested: float | None  # share of its correction samples a region of another label claims
    overlaps_with: list[int]  # labeled regions of another label that claim some of its samples
    oracle_label: int | None  # the oracle's majority vote on them (labeled regions; None: no
    # oracle in the run, `RunConfig.oracle_check`)
    oracle_agreement: float | None  # share of them the oracle classifies as `label`
    ambiguous: bool  # oracle_agreement < label_validity.AMBIGUOUS_BELOW (False: not checked)
    grid: str  # the sample grid, relative to the run directory
    # share of its judged error codes the evaluation-only judge reads as the source class
    # (`Report.bug_yield`; None: none of its codes judged, or an older run)
    bug_yield: NotRequired[float | None]


class BugYield(TypedDict):
    """The search's bug yield (`bug_yield`): the evaluation-only judge on the kept error codes."""

    judge: str  # what the judge is (it takes part in nothing else)
    judge_test_accuracy: float
    codes_judged: int  # all kept error codes, or a seeded subset of them on large runs
    bug: float | None  # share it reads as the source class: the image kept its class
    class_change: float | None  # share it reads as the classifier's prediction


class ControlReport(TypedDict):
    """The control of the correction (`CorrectConfig.control`): the same fine-tuning (seed,
    batches, epochs) on the training data alone, without any region sample. What it moves is
    what continued training alone moves, not what the regions do."""

    epochs: int  # as many as the kept model's
    test_accuracy: float
    region_accuracy: float | None  # over the same regions as the report's region accuracy


class CorrectionReport(TypedDict):
    """What the correction stage did (`Report.correction`)."""

    skipped: bool
    reason: str | None  # why it was skipped
    lam: float  # weight of the region loss of the kept model (the reference's value is 0.01)
    epochs: int  # epochs of the kept model (0: the original classifier was kept)
    resolve_overlap: bool  # overlapping regions of different labels got mixed targets
    seconds: float | None
    # The choice of lambda and epoch on validation data (`correction_selection`; None when
    # `CorrectConfig.select` is off): "chosen" and "original" scores, "kept_original",
    # "watched_regions", "num_val" and every epoch's scores per lambda ("per_lam").
    selection: NotRequired[dict[str, Any] | None]
    # None: `CorrectConfig.control` off, the original classifier kept, or correction skipped.
    control: NotRequired[ControlReport | None]


class _ReportRequired(TypedDict):
    dataset: str
    class_names: list[str]
    num_sources: int  # test points the search started from
    num_sources_used: int  # ... that the classifier got right (searched)
    num_sources_skipped: int
    num_samples_evaluated: int  # latent codes decoded and classified
    num_errors_found: int  # error codes kept
    num_flips: int  # misclassified samples before keeping the smallest per source
    num_regions: int  # every region distillation kept, error regions or not
    num_non_error_regions: int  # regions below min_error_rate: not labeled, not in accuracy
    num_codes_in_non_error_regions: int  # error codes those regions hold
    num_regions_labeled: int
    num_regions_skipped: int
    num_regions_confirmed: int  # labeled regions that are errors under their label (counted)
    # labeled regions whose held-out accuracy fell by more than WORSE_BY in the correction
    regions_worse_after: list[int]
    test_accuracy_before: float
    test_accuracy_after: float
    region_accuracy_before: float | None  # mean over the regions of region_accuracy_scope
    region_accuracy_after: float | None
    # "confirmed": the confirmed error regions; "labeled": every labeled region, when none is
    # a confirmed error (the labeler sided with the classifier everywhere); None: no label.
    region_accuracy_scope: Literal["confirmed", "labeled"] | None
    error_code_accuracy_before: float | None  # on the found codes, by their region's label
    error_code_accuracy_after: float | None
    num_error_codes_labeled: int  # the found codes those two cover: the ones in labeled regions
    oracle_agreement: float | None  # mean over labeled regions of the oracle's agreement with
    # the label on held-out region samples (None: no oracle, or nothing labeled)
    oracle_test_accuracy: float | None  # the oracle's own test accuracy (None: no oracle)
    num_ambiguous_regions: int  # labeled regions where the oracle disagrees on most samples
    regions: list[RegionReport]
    correction: CorrectionReport
    stage_seconds: dict[str, float]  # wall time of each finished stage before evaluate
    search: dict[str, Any]  # the search stage's summary (search/summary.json)
    devices: dict[str, Any]  # {"backend", "devices"}
    messages: list[str]  # what the user should know (nothing found, correction skipped, ...)
    config: dict[str, Any]  # the run's configuration (`dataclasses.asdict(RunConfig)`)


class Report(_ReportRequired, total=False):
    """``report.json``: every number of a run. Fractions are in [0, 1]; None is "n/a".

    `plots` ({"latent_pca" | "region_accuracy": path relative to the run directory}) is added
    by `write_report` for the plots it drew. `bug_yield` is absent in runs made before it.
    """

    plots: dict[str, str]
    bug_yield: BugYield | None


def assemble(
    *,
    dataset: str,
    class_names: Sequence[str],
    search: Mapping[str, Any],
    region_records: Sequence[Mapping[str, Any]],
    answers: Mapping[int, int | None],
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    oracle: label_validity.AgreementCheck | None = None,
    correction: CorrectionReport,
    stage_seconds: Mapping[str, float],
    devices: Mapping[str, Any],
    messages: Sequence[str],
    config: Mapping[str, Any],
    confirmed: Sequence[int] = (),
    overlap: Mapping[int, Mapping[str, Any]] | None = None,
    bug_yield: Mapping[str, Any] | None = None,
) -> Report:
    """A `Report` from a run's parts.

    Args:
      dataset: its name; class_names: [C] class names.
      search: the search stage's summary.
      region_records: distill/regions.json's records (means and covariances are left out).
      answers: {region id: label, or None for skipped} of the answered regions.
      before, after: `evaluation.evaluate_classifier` of the original and corrected models.
      oracle: the oracle's agreement with the labels (`label_validity.agreement_check`), or
        None when the run has no oracle.
      correction: what the correction did.
      stage_seconds: wall time per stage; devices: backend and devices; messages: notes.
      config: the run's configuration as a dict.
      confirmed: labeled regions that are errors under their label
        (`evaluation.confirmed_error_regions`); `before` and `after` hold region accuracy over
        these, or over every labeled region when there is none.
      overlap: `region_overlap.overlap_summary` of the labeled regions (None: not measured).
      bug_yield: `bug_yield.bug_yield` of the kept error codes (None: not measured).
    """
    overlap = overlap or {}
    per_region_yield = (bug_yield or {}).get("per_region", {})
    labels = {k: v for k, v in answers.items() if v is not None}
    regions: list[RegionReport] = []
    for rec in region_records:
        rid = int(rec["id"])
        label = answers.get(rid)
        check = (oracle or {}).get("per_region", {}).get(rid)
        regions.append(
            RegionReport(
                id=rid,
                num_codes=rec["num_codes"],
                weight=rec["weight"],
                source_label_counts=list(rec["source_label_counts"]),
                pred_label_counts=list(rec["pred_label_counts"]),
                majority_source_label=rec["majority_source_label"],
                majority_pred_label=rec["majority_pred_label"],
                error_rate=rec.get("error_rate"),
                top_pair=rec.get("top_pair"),
                purity=rec.get("purity", float("nan")),
                error_region=bool(rec.get("error_region", True)),
                label=label,
                label_name=class_names[label] if label is not None else None,
                skipped=rid in answers and label is None,
                accuracy_before=before["per_region"].get(rid),
                accuracy_after=after["per_region"].get(rid),
                confirmed_error=(rid in confirmed) if label is not None else None,
                contested=overlap.get(rid, {}).get("contested"),
                overlaps_with=sorted(int(k) for k in overlap.get(rid, {}).get("overlaps", {})),
                oracle_label=None if check is None else check["oracle_label"],
                oracle_agreement=None if check is None else check["agreement"],
                ambiguous=check is not None and check["ambiguous"],
                grid=RunDir.grid(rid),
                bug_yield=per_region_yield.get(rid),
            )
        )
    not_errors = [r for r in regions if not r["error_region"]]
    worse = [
        r["id"]
        for r in regions
        if r["accuracy_before"] is not None
        and r["accuracy_after"] is not None
        and r["accuracy_after"] < r["accuracy_before"] - WORSE_BY
    ]
    return Report(
        dataset=dataset,
        class_names=list(class_names),
        num_sources=search["num_sources"],
        num_sources_used=search["num_sources_used"],
        num_sources_skipped=search["num_sources_skipped"],
        num_samples_evaluated=search["num_samples_evaluated"],
        num_errors_found=search["num_errors_found"],
        num_flips=search["num_flips"],
        num_regions=len(regions),
        num_non_error_regions=len(not_errors),
        num_codes_in_non_error_regions=sum(r["num_codes"] for r in not_errors),
        num_regions_labeled=len(labels),
        num_regions_skipped=len(answers) - len(labels),
        num_regions_confirmed=len(confirmed),
        regions_worse_after=worse,
        test_accuracy_before=before["test_accuracy"],
        test_accuracy_after=after["test_accuracy"],
        region_accuracy_before=before["region_accuracy"],
        region_accuracy_after=after["region_accuracy"],
        region_accuracy_scope="confirmed" if confirmed else ("labeled" if labels else None),
        error_code_accuracy_before=before["error_code_accuracy"],
        error_code_accuracy_after=after["error_code_accuracy"],
        num_error_codes_labeled=before["num_error_codes_labeled"],
        oracle_agreement=oracle["agreement"] if oracle else None,
        oracle_test_accuracy=oracle["oracle_test_accuracy"] if oracle else None,
        num_ambiguous_regions=oracle["num_ambiguous"] if oracle else 0,
        regions=regions,
        correction=correction,
        stage_seconds=dict(stage_seconds),
        search=dict(search),
        devices=dict(devices),
        messages=list(messages),
        config=dict(config),
        bug_yield=bug_yield and BugYield(**{k: bug_yield[k] for k in BugYield.__annotations__}),
    )


PCA_PLOT: Final = "plots/latent_pca.png"
ACCURACY_PLOT: Final = "plots/region_accuracy.png"
_NA: Final = "n/a"


# --------------------------------------------------------------------------- helpers


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays to Python, non-finite floats to None.

    NaN/Infinity are not JSON; strict parsers (jq, browsers) reject them, so they become null.
    """
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("n/a" for None)."""
    return _NA if x is None else f"{100.0 * float(x):.1f}%"


def _pp(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return _NA
    return f"{100.0 * (float(after) - float(before)):+.1f} pp"


def _cell(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _class_name(class_names: Sequence[str], idx: int | None) -> str:
    if idx is None:
        return _NA
    idx = int(idx)
    return str(class_names[idx]) if 0 <= idx < len(class_names) else str(idx)


def _is_labeled(region: Mapping[str, Any]) -> bool:
    return not region.get("skipped") and region.get("label") is not None


def _region_label(region: Mapping[str, Any], class_names: Sequence[str]) -> str:
    if region.get("skipped"):
        return "skipped"
    if region.get("label") is None:
        return "unlabeled" if region.get("error_region", True) else "not an error region"
    return region.get("label_name") or _class_name(class_names, region["label"])


# --------------------------------------------------------------------------- plots


def pca_2d(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project codes [M, L] on their first two principal components (numpy SVD).

    Returns:
        ([M, 2] projection, [2] fraction of the variance each component explains). With L = 1 or
        rank-deficient codes the missing components are zeros.
    """
    x = np.asarray(codes, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((x.shape[0], 2))
    proj[:, :k] = x @ vt[:k].T
    total = float(np.sum(s**2))
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return proj, explained


def plot_latent_pca(
    path: str, codes: np.ndarray, assignment: np.ndarray, *, title: str | None = None
) -> str:
    """Scatter the error codes in 2-D PCA coordinates, coloured by region; returns path."""
    proj, explained = pca_2d(codes)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    outside = assignment < 0
    if outside.any():
        ax.scatter(*proj[outside].T, s=4, c="lightgrey", alpha=0.6, label="no region")
    region_ids = np.unique(assignment[~outside])
    cmap = plt.get_cmap("tab20" if len(region_ids) > 10 else "tab10")
    for i, rid in enumerate(region_ids):
        pts = proj[assignment == rid]
        color = cmap(i % cmap.N)
        ax.scatter(*pts.T, s=6, color=color, alpha=0.7, label=f"region {rid}")
        cx, cy = pts.mean(axis=0)
        ax.annotate(
            str(rid),
            (cx, cy),
            ha="center",
            va="center",
            fontsize=9,
            weight="bold",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": color, "alpha": 0.85},
        )
    ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.set_title(title or f"Error codes in latent space (M = {len(proj)})", fontsize=10)
    if 0 < len(region_ids) <= 20:  # a legend with dozens of entries hides the points
        ax.legend(fontsize=7, markerscale=2, loc="best", framealpha=0.8)
    save_figure(fig, path)
    return path


def plot_region_accuracy(
    path: str,
    regions: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    overall_before: float | None,
    overall_after: float | None,
    overall_of: str = "all regions",
) -> str:
    """Grouped bars of accuracy before/after per region, dashed lines for the region accuracy
    (the mean over `overall_of`, which need not be every region drawn); returns path."""
    n = len(regions)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * n + 2.0), 4.0))
    x = np.arange(n)
    width = 0.38
    for offset, key, color, name in (
        (-width / 2, "accuracy_before", "tab:red", "before"),
        (width / 2, "accuracy_after", "tab:green", "after"),
    ):
        values = [r.get(key) for r in regions]
        heights = [100.0 * v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + offset, heights, width, color=color, label=name)
        for bar, v in zip(bars, values, strict=True):
            if v is None:  # make a missing value visible instead of a silent zero bar
                ax.text(bar.get_x() + bar.get_width() / 2, 1.0, _NA, ha="center", fontsize=7)
    for value, color, name in (
        (overall_before, "tab:red", f"region accuracy before\n({overall_of})"),
        (overall_after, "tab:green", f"region accuracy after\n({overall_of})"),
    ):
        if value is not None:
            ax.axhline(100.0 * value, color=color, ls="--", lw=1, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [f"{r['id']}\n({_region_label(r, class_names)})" for r in regions], fontsize=7
    )
    ax.set_xlim(-1.0, n)  # keeps bars narrow when only one or two regions are labeled
    ax.set_xlabel("region (label)")
    ax.set_ylabel("accuracy on held-out region samples (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Region accuracy before / after correction", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path)
    return path


# --------------------------------------------------------------------------- markdown


def _summary_lines(report: Mapping[str, Any]) -> list[str]:
    n_err = report["num_errors_found"]
    text = (
        f"The search started from {report['num_sources_used']:,} of {report['num_sources']:,} "
        f"source points ({report['num_sources_skipped']:,} skipped because the classifier "
        f"already got them wrong), decoded and classified "
        f"{report['num_samples_evaluated']:,} samples and found {report['num_flips']:,} "
        f"misclassified ones, of which {n_err:,} error codes were kept."
    )
    if n_err == 0:
        text += " **No errors were found**, so there are no regions to label or correct."
    elif report["num_regions"] == 0:
        text += " Distillation kept **no region**, so there is nothing to label or correct."
    else:
        text += (
            f" Distillation kept {report['num_regions']} misclassification regions; "
            f"{report['num_regions_labeled']} labeled, {report['num_regions_skipped']} skipped."
        )
        if report.get("num_non_error_regions"):
            text += (
                f" {report['num_non_error_regions']} regions "
                f"({report['num_codes_in_non_error_regions']:,} error codes) are **not error "
                "regions** (the classifier gets most of their fresh samples right): they were "
                "not offered for labeling and are not in the region accuracy."
            )
        agree = report["num_regions_labeled"] - report.get(
            "num_regions_confirmed", report["num_regions_labeled"]
        )
        if agree > 0 and report.get("region_accuracy_scope") == "labeled":
            text += (
                f" The labeler sided with the classifier in all {agree} labeled regions: no "
                "labeled region is a confirmed error, so region accuracy covers every labeled "
                "region (the correction only has to keep them right)."
            )
        elif agree > 0:
            text += (
                f" {agree} labeled regions got the label the classifier already predicts (the "
                "labeler sided with the classifier): they are no bug and are not in the region "
                "accuracy, which covers the "
                f"{report.get('num_regions_confirmed', 0)} confirmed error regions."
            )
        if report["num_regions_labeled"] == 0:
            text += " **No region is labeled**, so the classifier was not corrected."
    worse = report.get("regions_worse_after") or []
    if worse:
        text += (
            f" **{len(worse)} labeled regions ended more than {WORSE_BY:.0%} worse than they "
            f"started** ({', '.join(map(str, worse))})."
        )
    contested = [r["id"] for r in report["regions"] if r.get("overlaps_with")]
    if contested:
        text += (
            f" {len(contested)} labeled regions overlap regions of another label "
            f"({', '.join(map(str, contested))}); "
            + (
                "their shared samples were trained on responsibility-weighted label mixes."
                if report["correction"].get("resolve_overlap")
                else "the correction trained each sample on its own region's label."
            )
        )
    lines = [text]
    lines += _bug_yield_lines(report)
    if report.get("oracle_agreement") is not None:
        ambiguous = [r["id"] for r in report["regions"] if r.get("ambiguous")]
        lines += [
            "",
            f"Label validity: the oracle classifier (trained separately, test accuracy "
            f"{pct(report.get('oracle_test_accuracy'))}) agrees with the region labels on "
            f"{pct(report['oracle_agreement'])} of fresh region samples (mean over the labeled "
            "regions). "
            + (
                f"**{len(ambiguous)} ambiguous labeled region{'s' * (len(ambiguous) != 1)}** "
                "(it disagrees on most of their samples): "
                f"{'region' if len(ambiguous) == 1 else 'regions'} "
                f"{', '.join(map(str, ambiguous))}. Their labels were kept; "
                "look at their grids before trusting their accuracy."
                if ambiguous
                else "No labeled region is ambiguous."
            ),
        ]
    return lines


def _bug_yield_lines(report: Mapping[str, Any]) -> list[str]:
    found = report.get("bug_yield")
    if not found or found.get("bug") is None:
        return []
    validity = (report.get("search", {}).get("config") or {}).get("validity", "none")
    steer = (
        "the search counted every changed prediction (`--search-validity none`, the paper's)"
        if validity == "none"
        else f"the search kept only samples the {validity} still reads as the source class "
        f"(`--search-validity {validity}`)"
    )
    return [
        "",
        f"Bug yield: of {found['codes_judged']:,} kept error codes, the judge reads "
        f"**{pct(found['bug'])} as their source class** (bugs: the image kept its class) and "
        f"{pct(found['class_change'])} as the class the classifier predicts (class changes). "
        f"The judge, {found['judge']} (test accuracy {pct(found['judge_test_accuracy'])}), "
        f"takes part in nothing else; {steer}.",
    ]


# What region accuracy averages over (`Report.region_accuracy_scope`), in words.
_SCOPES: Final = {"confirmed": "confirmed error regions", "labeled": "all labeled regions"}


def before_after_table(report: Mapping[str, Any]) -> str:
    """The before/after accuracy table of a report, as Markdown (e.g. for a notebook)."""
    return "\n".join(_results_table(report))


def _results_table(report: Mapping[str, Any]) -> list[str]:
    scope = _SCOPES.get(report.get("region_accuracy_scope") or "", "held-out region samples")
    rows = (
        ("Test accuracy", "test_accuracy"),
        (f"Region accuracy ({scope})", "region_accuracy"),
        (_codes_row(report.get("num_error_codes_labeled")), "error_code_accuracy"),
    )
    lines = ["| metric | before | after | change |", "|---|---:|---:|---:|"]
    for name, key in rows:
        b, a = report.get(f"{key}_before"), report.get(f"{key}_after")
        lines.append(f"| {name} | {pct(b)} | {pct(a)} | {_pp(b, a)} |")
    return lines


def _codes_row(n: int | None) -> str:
    if n is None:  # a report from before the count was kept
        return "Accuracy on the found error codes in labeled regions"
    return f"Accuracy on the {n:,} found error codes in labeled regions (by the region's label)"


def _regions_section(report: Mapping[str, Any]) -> list[str]:
    regions = report["regions"]
    names = report["class_names"]
    if not regions:
        return ["No misclassification regions."]
    lines = []
    for title, group in (
        ("Error regions", [r for r in regions if r.get("error_region", True)
                           and r.get("confirmed_error") is not False]),
        ("Labeled as the classifier predicts (no bug; not in region accuracy)",
         [r for r in regions if r.get("confirmed_error") is False]),
        ("Not error regions (error rate below the threshold)",
         [r for r in regions if not r.get("error_region", True)]),
    ):  # fmt: skip
        if group:
            lines += [f"**{title}**", "", *_regions_table(group, names), ""]
    lines += [
        "*Error rate*: the share of fresh region samples the classifier does not call the "
        "region's majority source label (measured before labeling, to decide which regions are "
        "errors). *Accuracy*: the share of held-out region samples it calls the region's label. "
        "The two differ where the label is not the source label.",
        "",
    ]
    lines.pop()
    grids = [r for r in regions if r.get("grid")]
    if grids:
        lines += ["", "### Region samples", ""]
        for r in grids:
            lines += [
                f"**Region {r['id']}** ({_cell(_region_label(r, names))}):",
                "",
                f"![region {r['id']}]({r['grid']})",
                "",
            ]
        lines.pop()
    return lines


def _regions_table(regions: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    lines = [
        "| region | codes | weight | top source -> predicted | purity | error rate | label "
        "| oracle agrees | accuracy before -> after | overlap | bug yield |",
        "|---:|---:|---:|---|---:|---:|---|---|---|---|---:|",
    ]
    for r in regions:
        src, pred = top_pair(r)  # the pair purity counts
        flow = f"{_class_name(names, src)} -> {_class_name(names, pred)}"
        acc = (
            f"{pct(r.get('accuracy_before'))} -> {pct(r.get('accuracy_after'))}"
            if _is_labeled(r)
            else _NA
        )
        lines.append(
            f"| {r['id']} | {r['num_codes']:,} | {float(r['weight']):.3f} | {_cell(flow)} "
            f"| {pct(r.get('purity'))} | {pct(r.get('error_rate'))} "
            f"| {_cell(_region_label(r, names))} | {_cell(_oracle_cell(r, names))} | {acc} "
            f"| {_overlap_cell(r)} | {pct(r.get('bug_yield'))} |"
        )
    return lines


def _overlap_cell(region: Mapping[str, Any]) -> str:
    if not region.get("overlaps_with"):
        return "none" if region.get("contested") is not None else _NA
    ids = ", ".join(map(str, region["overlaps_with"]))
    return f"{pct(region.get('contested'))} contested (with {ids})"


def _oracle_cell(region: Mapping[str, Any], names: Sequence[str]) -> str:
    """'92%', or '12% **ambiguous** (says 7)', or n/a when the label was not checked."""
    agreement = region.get("oracle_agreement")
    if agreement is None:
        return _NA
    if not region.get("ambiguous"):
        return pct(agreement)
    return f"{pct(agreement)} **ambiguous** (says {_class_name(names, region.get('oracle_label'))})"


def _timings_section(stage_seconds: Mapping[str, float]) -> list[str]:
    if not stage_seconds:
        return ["No stage timings recorded."]
    order = [s for s in STAGES if s in stage_seconds]
    order += sorted(s for s in stage_seconds if s not in STAGES)
    lines = ["| stage | seconds |", "|---|---:|"]
    total = 0.0
    for s in order:
        sec = stage_seconds[s]
        total += float(sec or 0.0)
        lines.append(f"| {_cell(s)} | {_NA if sec is None else f'{float(sec):.1f}'} |")
    lines.append(f"| **total** | **{total:.1f}** |")
    return lines


def correction_summary(report: Mapping[str, Any]) -> str:
    """How the corrected model was chosen, as one Markdown paragraph (e.g. for a notebook)."""
    corr = report.get("correction") or {}
    if corr.get("skipped"):
        return f"Correction was skipped: {corr.get('reason') or 'no reason given'}."
    return " ".join(_correction_lines(corr) + _control_lines(report)) if corr else ""


def _control_lines(report: Mapping[str, Any]) -> list[str]:
    """What the same fine-tuning without regions did (`ControlReport`), next to the correction."""
    ctl = (report.get("correction") or {}).get("control")
    if not ctl:
        return []
    before = report["test_accuracy_before"]
    return [
        f"Control: the same fine-tuning ({ctl['epochs']} epochs, same seed and batches) on the "
        f"training data alone, without any region sample, moves test accuracy "
        f"{pct(before)} -> {pct(ctl['test_accuracy'])} "
        f"({_pp(before, ctl['test_accuracy'])}, against "
        f"{_pp(before, report['test_accuracy_after'])} with the regions) and region accuracy "
        f"{pct(report['region_accuracy_before'])} -> {pct(ctl['region_accuracy'])} "
        f"(against {pct(report['region_accuracy_after'])}): a test change the control shares "
        "comes from continued training, not from the regions."
    ]


def _correction_lines(corr: Mapping[str, Any]) -> list[str]:
    """How the kept model was chosen (or that the reference schedule was used)."""
    sec = corr.get("seconds")
    took = f" ({float(sec):.1f} s)" if sec is not None else ""
    sel = corr.get("selection")
    if not sel:
        return [
            f"Correction fine-tuned the classifier for {corr.get('epochs')} epochs with "
            f"lambda = {corr.get('lam')}{took}, keeping the last epoch (no choice on "
            "validation data)."
        ]
    chosen, original = sel["chosen"], sel["original"]
    tried = ", ".join(sel.get("per_lam", {}))
    watched = len(sel.get("watched_regions", []))
    scores = (
        f"validation accuracy {pct(original['val_accuracy'])} -> {pct(chosen['val_accuracy'])} "
        f"on {sel.get('num_val')} validation images, accuracy on the choice's own fresh "
        f"samples of the {watched} watched regions {pct(original['region_accuracy'])} -> "
        f"{pct(chosen['region_accuracy'])}, drawn apart from the evaluation's"
    )
    if sel.get("kept_original"):
        return [
            f"Correction tried lambda in {{{tried}}}, but no epoch both stayed within the "
            "allowed losses on held-out data (validation accuracy, every labeled region) and "
            f"fixed the watched regions better than the original, so **the original classifier "
            f"is kept**{took}."
        ]
    return [
        f"Correction tried lambda in {{{tried}}} and kept **lambda = {chosen['lam']:g}, epoch "
        f"{chosen['epoch']}**: of the epochs within a point of the best fix, the one that "
        f"breaks the fewest shifted training images{_churn(chosen)} (then the gentlest: "
        "smallest lambda, earliest epoch), chosen on held-out data, never on the test "
        f"split ({scores}){took}. The paper's reference is lambda = 0.01, last epoch "
        "(`--no-correct-select`)." + _given_up(sel.get("given_up") or [])
    ]


def _given_up(given_up: Sequence[Mapping[str, Any]]) -> str:
    if not given_up:
        return ""
    many = len(given_up) > 1
    which = ", ".join(f"{g['region']} ({pct(g['before'])} -> {pct(g['after'])})" for g in given_up)
    return (
        f" **{len(given_up)} labeled region{'s' * (len(given_up) != 1)} could not be held** "
        f"with the rest: every epoch that fixed the watched regions broke "
        f"{'them' if many else 'it'} (accuracy on the choice's samples before -> after: "
        f"{which}), so {'they were' if many else 'it was'} given up rather than the whole "
        "correction (`--correct-max-given-up`, a share of the labeled regions; 0 keeps the "
        "original instead). Look at their grids: a region the classifier's own training keeps "
        "moving, or one pulled both ways by another region, cannot be held."
    )


def _churn(chosen: Mapping[str, Any]) -> str:
    n = chosen.get("shifted_broken")
    return "" if n is None else f" ({n:,})"  # None: a run from before it was scored


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str], *, run_dir: str) -> str:
    """Render the human summary of a run (see :func:`write_report` for the report schema)."""
    out = [f"# Defuse report: {report['dataset']}", "", "## What happened", ""]
    out += _summary_lines(report)
    if report.get("messages"):
        out += ["", "Notes:", ""] + [f"- {m}" for m in report["messages"]]

    out += ["", "## Before / after correction", ""] + _results_table(report)
    if report.get("correction"):
        out += ["", correction_summary(report)]

    out += ["", "## Regions", ""] + _regions_section(report)

    if plots:
        out += ["", "## Plots", ""]
        if "latent_pca" in plots:
            out += ["![latent PCA of the error codes by region](" + plots["latent_pca"] + ")", ""]
        if "region_accuracy" in plots:
            out += ["![accuracy before and after per region](" + plots["region_accuracy"] + ")", ""]
        out.pop()

    out += ["", "## Stage timings", ""] + _timings_section(report.get("stage_seconds") or {})
    dev = report.get("devices") or {}
    if dev:
        devices = ", ".join(str(d) for d in dev.get("devices") or []) or _NA
        out += ["", f"Backend: {dev.get('backend', _NA)}; devices: {devices}."]

    out += [
        "",
        "## Relabel and rerun",
        "",
        f"The region labels live in `{LABELS_FILE}`. To change some, edit their `label` cells "
        "(a class name or index, or `skip`) and rerun: only the correction and the evaluation are "
        "redone. To label the regions by hand in the terminal instead (a run labeled "
        "automatically then redoes its label stage, which asks every region):",
        "",
        "```sh",
        f"defuse-jax label --out {run_dir} --labeler manual",
        f"defuse-jax run --out {run_dir}",
        "```",
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point


def read_report(run_dir: str) -> Report:
    """The `Report` of a finished run (<run_dir>/report.json)."""
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def write_report(
    run_dir: str, report: Mapping[str, Any], *, codes: np.ndarray, assignment: np.ndarray
) -> dict[str, str]:
    """Write <run_dir>/report.json, <run_dir>/report.md and plots under <run_dir>/plots/.

    Args:
        run_dir: the run directory (created if missing).
        report: a `Report` (see `assemble`). It is not modified.
        codes: [M, L] float32 latent codes of the errors the search found (M may be 0).
        assignment: [M] int32 region index of each code, -1 for codes outside every kept region.

    Returns:
        {"json": path, "markdown": path, "latent_pca": path or absent,
        "region_accuracy": path or absent}; each path is ``os.path.join(run_dir, ...)``.

    Raises:
        ValueError: codes is not 2-D or assignment does not have one entry per code.
    """
    codes = np.asarray(codes, np.float32)
    assignment = np.asarray(assignment, np.int64).reshape(-1)
    if codes.ndim != 2:
        if codes.size == 0:  # an empty search may hand over a shapeless empty array
            codes = codes.reshape(0, 0)
        else:
            raise ValueError(f"codes must be [M, L], got shape {codes.shape}")
    if assignment.shape[0] != codes.shape[0]:
        raise ValueError(f"assignment has {assignment.shape[0]} entries for {codes.shape[0]} codes")
    make_dirs(run_dir)
    names = report.get("class_names") or []
    plots: dict[str, str] = {}
    paths: dict[str, str] = {}

    finite = np.isfinite(codes).all(axis=1) if codes.size else np.zeros(0, bool)
    if codes.shape[0] >= 3 and codes.shape[1] >= 1 and finite.sum() >= 3:
        paths["latent_pca"] = plot_latent_pca(
            os.path.join(run_dir, PCA_PLOT),
            codes[finite],
            assignment[finite],
            title=f"{report.get('dataset', '')}: {int(finite.sum()):,} error codes by region",
        )
        plots["latent_pca"] = PCA_PLOT

    labeled = [r for r in report.get("regions") or [] if _is_labeled(r)]
    has_numbers = any(
        r.get("accuracy_before") is not None or r.get("accuracy_after") is not None for r in labeled
    )
    if has_numbers:  # labeled regions without an accuracy show as n/a bars
        paths["region_accuracy"] = plot_region_accuracy(
            os.path.join(run_dir, ACCURACY_PLOT),
            labeled,
            class_names=names,
            overall_before=report.get("region_accuracy_before"),
            overall_after=report.get("region_accuracy_after"),
            overall_of=_SCOPES.get(report.get("region_accuracy_scope") or "", "all regions"),
        )
        plots["region_accuracy"] = ACCURACY_PLOT

    for key, rel in (("latent_pca", PCA_PLOT), ("region_accuracy", ACCURACY_PLOT)):
        stale = os.path.join(run_dir, rel)
        if key not in plots and os.path.exists(stale):  # from an earlier report of this run
            remove(stale)

    data = _jsonable({**report, "plots": plots})
    json_path = os.path.join(run_dir, "report.json")
    with atomic_write(json_path) as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    md_path = os.path.join(run_dir, "report.md")
    markdown = render_markdown(data, plots, run_dir=run_dir)
    with atomic_write(md_path) as f:
        f.write(markdown)
    return {"json": json_path, "markdown": md_path, **paths}
