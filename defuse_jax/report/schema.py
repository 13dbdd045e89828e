"""`report.json`'s schema: `Report` and its parts (TypedDicts: the file is plain JSON, the keys
and their meaning are fixed here)."""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired, TypedDict

WORSE_BY: Final = 0.05  # a region "ends worse" when its accuracy falls by more than this
JUDGE_AGREES: Final = 0.5  # the judge backs a label it reads on at least this share of samples


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
    # share of its held-out samples the judge reads as its label, a second opinion on the label
    # (`bug_yield.label_agreement`; None: not labeled, or an older run)
    judge_agreement: NotRequired[float | None]


class JudgeScore(TypedDict):
    """A candidate judge (`bug_yield.every_judge`): how it reads the test split, and the codes."""

    judge: str
    test_accuracy: float
    on_right: float | None  # share of the test images the classifier gets right it reads right
    on_wrong: float | None  # ... of the classifier's test errors (None: it makes none)
    balanced: float | None  # their mean (on_right alone without errors): the judge is chosen by it
    bug: float | None  # its bug yield on the kept error codes
    chosen: bool  # the judge whose readings the report gives


class BugYield(TypedDict):
    """The search's bug yield (`bug_yield`): the evaluation-only judge on the kept error codes."""

    judge: str  # what the judge is (it takes part in nothing else)
    judge_test_accuracy: float
    codes_judged: int  # all kept error codes, or a seeded subset of them on large runs
    bug: float | None  # share it reads as the source class: the image kept its class
    class_change: float | None  # share it reads as the classifier's prediction
    # The scale (`bug_yield.test_error_yield`; absent in older runs): the classifier's test
    # errors, which are bugs by their labels, and the share of them the judge reads as their label
    test_errors: NotRequired[int]
    test_error_yield: NotRequired[float | None]
    # confirmed error regions whose held-out samples the judge reads as their label at least
    # JUDGE_AGREES of the time (absent in older runs)
    confirmed_judge_agrees: NotRequired[int]
    # every candidate judge, the chosen one among them (absent in older runs)
    judges: NotRequired[list[JudgeScore]]


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
    oracle_members: NotRequired[int | None]  # classifiers it averages (later field; None: no
    # oracle)
    # the share of the classifier's test errors the oracle reads as their label (later field;
    # None: no oracle, no label or no error)
    oracle_on_test_errors: NotRequired[float | None]
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
    by `write_report` for the plots it drew. `bug_yield` and `own_models` are absent in runs
    made before them.
    """

    plots: dict[str, str]
    bug_yield: BugYield | None
    # The user's own models the run debugged or searched with ({"classifier" | "vae":
    # `own_model.describe`: name, kind, number of weights, frozen ones, sha256}); {}: none.
    own_models: dict[str, dict[str, Any]]
