"""`assemble`: a `Report` from a run's evaluated numbers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from defuse_jax import label_validity
from defuse_jax.report.schema import (
    JUDGE_AGREES,
    WORSE_BY,
    BugYield,
    CorrectionReport,
    RegionReport,
    Report,
)
from defuse_jax.run_dir import RunDir


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
    own_models: Mapping[str, Mapping[str, Any]] | None = None,
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
      own_models: the identities of the user's own models the run used
        ({"classifier"/"vae": `own_model.describe`}; empty: the project's own).
    """
    overlap = overlap or {}
    per_region_yield = (bug_yield or {}).get("per_region", {})
    judge_agreement = (bug_yield or {}).get("label_agreement", {})
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
                judge_agreement=judge_agreement.get(rid),
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
        oracle_members=oracle.get("oracle_members") if oracle else None,
        oracle_on_test_errors=oracle.get("oracle_on_test_errors") if oracle else None,
        num_ambiguous_regions=oracle["num_ambiguous"] if oracle else 0,
        regions=regions,
        correction=correction,
        stage_seconds=dict(stage_seconds),
        search=dict(search),
        devices=dict(devices),
        messages=list(messages),
        config=dict(config),
        bug_yield=bug_yield and _bug_yield(bug_yield, confirmed),
        own_models={k: dict(v) for k, v in (own_models or {}).items()},
    )


def _bug_yield(found: Mapping[str, Any], confirmed: Sequence[int]) -> BugYield:
    """The report's `BugYield` from `bug_yield`'s figures, with the confirmed error regions the
    judge backs (when it read the labeled regions' samples)."""
    out = BugYield(**{k: found[k] for k in BugYield.__annotations__ if k in found})
    agreement = found.get("label_agreement")
    if agreement is not None:
        out["confirmed_judge_agrees"] = sum(
            agreement.get(rid, 0.0) >= JUDGE_AGREES for rid in confirmed
        )
    return out
