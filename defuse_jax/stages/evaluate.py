"""The evaluate stage: the original, corrected and control classifiers on the test split and the
held-out region samples, the oracle's agreement with the labels, the bug yield, and the report."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from defuse_jax import bug_yield, evaluation, identification, label_validity
from defuse_jax import report as report_lib
from defuse_jax import train_models as tm
from defuse_jax.correction import CorrectConfig
from defuse_jax.files import read_json
from defuse_jax.regions import load_regions, no_region_note, not_converged_note
from defuse_jax.run_config import STAGES
from defuse_jax.stage_context import Context
from defuse_jax.stages.label import read_answers


def stage_evaluate(ctx: Context) -> report_lib.Report:
    return build_report(ctx)


def build_report(ctx: Context) -> report_lib.Report:
    """Evaluate before/after, write report.json, report.md and the plots; returns the report
    as written."""
    ds = ctx.dataset
    regions = load_regions(ctx.path("distill"))
    errors = identification.load_errors(ctx.path("search"))
    answers = read_answers(ctx) if regions.num_regions else {}
    labels = {k: v for k, v in answers.items() if v is not None}
    correct_summary = read_json(ctx.dir.record("correct"))["summary"]
    # Decoded once for every classifier evaluated here (and the oracle's check).
    eval_set = evaluation.eval_set(
        ctx.model("vae"), x_test=ds.x_test, y_test=ds.y_test, regions=regions, labels=labels,
        errors=errors, config=ctx.config.eval,
    )  # fmt: skip
    before = evaluation.evaluate_on(ctx.model("classifier"), eval_set)
    after = (
        before if correct_summary["skipped"]
        else evaluation.evaluate_on(ctx.model("corrected"), eval_set)
    )  # fmt: skip
    control = (
        evaluation.evaluate_on(ctx.model("control"), eval_set)
        if correct_summary.get("control") else None
    )  # fmt: skip
    # Region accuracy counts the regions that are errors under their label (not those where
    # the labeler sided with the classifier).
    confirmed = evaluation.confirmed_error_regions(
        before["per_region"], min_error_rate=ctx.config.distill.min_error_rate
    )
    # With no confirmed error (the labeler sided with the classifier everywhere) it covers every
    # labeled region, which the correction must then keep right (`Report.region_accuracy_scope`).
    scope = confirmed or sorted(labels)
    before, after, control = (
        ev and {**ev, "region_accuracy": evaluation.region_accuracy(ev["per_region"], scope)}
        for ev in (before, after, control)
    )
    # The classifier's test predictions, for the oracle's and the judges' reading of its errors.
    test_pred = np.asarray(evaluation.classify(ctx.model("classifier"), ds.x_test))
    oracle = (_oracle_agreement(ctx, eval_set, labels, test_pred) if ctx.config.uses_oracle
              else None)  # fmt: skip
    found_yield = _bug_yield(ctx, errors, regions.assignment, eval_set, test_pred)
    search = read_json(ctx.path("search", "summary.json"))
    if search["num_errors_found"] == 0:
        ctx.messages.append(
            "The search found no errors: the classifier was never fooled within the search "
            "radius. Widen the search (--search-scale, --search-num-samples) to probe further."
        )
    thin = identification.thin_search_note(search, ctx.config.search)
    if thin:
        ctx.messages.append(thin)
    notes = [
        not_converged_note(ctx.config.distill.max_iter) if not regions.converged else None,
        no_region_note(search["num_errors_found"], regions.num_regions, ctx.config.distill),
    ]
    ctx.messages.extend(f"{note[0].upper()}{note[1:]}." for note in notes if note)
    if correct_summary["skipped"]:
        ctx.messages.append(correct_summary["reason"])
    kept_epochs = _kept_epochs(ctx.config.correct, correct_summary.get("selection"))
    stage_seconds = {
        stage: read_json(ctx.dir.record(stage))["seconds"]
        for stage in STAGES[:-1]
        if os.path.exists(ctx.dir.record(stage))
    }
    report = report_lib.assemble(
        dataset=ds.name,
        class_names=ds.class_names,
        search=search,
        region_records=regions.records,
        answers=answers,
        before=before,
        after=after,
        oracle=oracle,
        correction=report_lib.CorrectionReport(
            skipped=correct_summary["skipped"],
            reason=correct_summary.get("reason"),
            lam=_kept_lam(ctx.config.correct, correct_summary.get("selection")),
            epochs=kept_epochs,
            selection=correct_summary.get("selection"),
            control=control
            and report_lib.ControlReport(
                epochs=kept_epochs,
                test_accuracy=control["test_accuracy"],
                region_accuracy=control["region_accuracy"],
            ),
            resolve_overlap=ctx.config.correct.resolve_overlap,
            seconds=correct_summary.get("seconds"),
        ),
        stage_seconds=stage_seconds,
        devices={"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]},
        messages=ctx.messages,
        config=dataclasses.asdict(ctx.config),
        confirmed=confirmed,
        overlap={int(k): v for k, v in correct_summary.get("overlap", {}).items()},
        bug_yield=found_yield,
        own_models=ctx.own,
    )
    report_lib.write_report(ctx.run_dir, report, codes=errors["z"], assignment=regions.assignment)
    pct = report_lib.pct
    ctl = report["correction"].get("control")
    ctx.log(
        f"evaluate: test accuracy {pct(report['test_accuracy_before'])} -> "
        f"{pct(report['test_accuracy_after'])}"
        + (f" (control without regions: {pct(ctl['test_accuracy'])})" if ctl else "")
        + ", region accuracy "
        f"{pct(report['region_accuracy_before'])} -> {pct(report['region_accuracy_after'])}"
    )
    return report_lib.read_report(ctx.run_dir)


def _bug_yield(
    ctx: Context,
    errors: Mapping[str, np.ndarray],
    assignment: np.ndarray,
    eval_set: evaluation.EvalSet,
    pred: np.ndarray,
) -> dict[str, Any] | None:
    """The evaluation-only judge (`bug_yield`) on the kept error codes, with its reading of the
    classifier's test errors (`pred`: [N] its test predictions) and of the labeled regions'
    held-out samples; None without codes."""
    z = np.asarray(errors["z"])
    if len(z) == 0:
        return None
    ds, seed = ctx.dataset, ctx.config.data.seed
    # Chosen on the test split by how well it reads both the images the classifier gets right
    # and its errors; a conv candidate (larger images) trains like the classifier, own seed.
    choice = bug_yield.judge_for(ds, pred, cache_dir=ctx.path("cache", "judge"), seed=seed,
                                 train=ctx.config.classifier_train,
                                 progress=ctx.config.progress)  # fmt: skip
    codes = bug_yield.decode_codes(ctx.model("vae"), z, errors["source_label"],
                                   errors["pred_label"], region=assignment, seed=seed)  # fmt: skip
    found, judges = bug_yield.every_judge(choice, codes)
    return {
        **found,
        # Its scale: what the judge makes of the classifier's own test errors (certain bugs).
        **bug_yield.test_error_yield(choice.judge, ds.x_test, ds.y_test, pred),
        "label_agreement": bug_yield.label_agreement(choice.judge, eval_set),
        "judges": judges,
    }


def _kept_lam(cfg: CorrectConfig, selection: Mapping[str, Any] | None) -> float:
    """The region weight of the kept model (0.0: the original classifier was kept)."""
    return cfg.lam if selection is None else float(selection["chosen"]["lam"])


def _kept_epochs(cfg: CorrectConfig, selection: Mapping[str, Any] | None) -> int:
    return cfg.epochs if selection is None else int(selection["chosen"]["epoch"])


def _oracle_agreement(
    ctx: Context, eval_set: evaluation.EvalSet, labels: Mapping[int, int], test_pred: np.ndarray
) -> label_validity.AgreementCheck:
    """The oracle (trained by the label stage) against the final labels, on the held-out region
    samples region accuracy is measured on. With no labeled region (the label stage then
    trains no oracle when there is no region at all) nothing is checked."""
    oracle_dir = ctx.path("label", "oracle")
    record = tm.ensemble_record(oracle_dir) if os.path.isdir(oracle_dir) else {}
    test = (record.get("test") or {}).get("accuracy")
    votes = evaluation.heldout_votes(ctx.model("oracle"), eval_set) if labels else {}
    return label_validity.agreement_check(
        votes, labels, oracle_test_accuracy=test, oracle_members=record.get("members"),
        oracle_on_test_errors=_oracle_on_test_errors(ctx, test_pred) if labels else None,
    )  # fmt: skip


def _oracle_on_test_errors(ctx: Context, test_pred: np.ndarray) -> float | None:
    """The share of the classifier's test errors (bugs by their labels) the oracle reads as
    their label (`test_pred`: [N] the classifier's test predictions); None without errors. An
    oracle that shares the classifier's blind spots (10-57% unshifted on 8x8 digits, 25-75%
    for the mean of today's committee there; 0-30% unshifted on 28x28 ones) throws real bugs
    away in the search and can label a bug region with the classifier's own answer."""
    ds = ctx.dataset
    wrong = test_pred != ds.y_test
    if not wrong.any():
        return None
    read = np.asarray(evaluation.classify(ctx.model("oracle"), ds.x_test[wrong]))
    return float(np.mean(read == ds.y_test[wrong]))
