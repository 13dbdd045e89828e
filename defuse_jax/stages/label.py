"""The label stage on a run directory: region sample grids, the automatic labelers (majority
source label, or a separately trained oracle classifier), the oracle's check of every region's
suggested label (`label_validity`; `RunConfig.oracle_check`), the labels file a person answers
in, and `set_labels`, how a notebook answers (a terminal: `pipeline.label_interactively`, which
runs the stages before it). The labels file itself and the answer grammar are
`defuse_jax.labeling`'s.

When the oracle is trained: in the label stage, into label/oracle/, whenever the run uses it
(`RunConfig.uses_oracle`: the oracle labeler, or `oracle_check`, on by default). It is trained
once per run directory: a rerun, the terminal labeler and `defuse-jax sweep-budget` (which
copies it into every budget point) reload its finished checkpoint, and the evaluation reuses it
to measure its agreement with the final labels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from defuse_jax import evaluation, labeling, models, plots, training_lengths
from defuse_jax import label_validity as validity
from defuse_jax import train_models as tm
from defuse_jax.config_checks import fingerprint_fields, without_later_defaults
from defuse_jax.files import make_dirs, move, read_json, write_json
from defuse_jax.models import ClassifierConfig, Params
from defuse_jax.regions import Regions, is_error_region, load_regions, sample_regions, top_pair
from defuse_jax.run_config import RunConfig
from defuse_jax.run_dir import RunDir
from defuse_jax.stage_context import Context, LabelsPending
from defuse_jax.training import TrainConfig

# Fresh samples per region the oracle votes on in the label stage.
ORACLE_SAMPLES = 64
# Classifiers in the oracle when it is of the classifier's own kind (`oracle_members`).
DEFAULT_ORACLE_MEMBERS = 3
ORACLE_CHECK_FILE = "label/oracle_check.json"


def region_rows(
    regions: Regions, checks: Mapping[int, validity.RegionCheck] | None = None
) -> list[dict[str, Any]]:
    """The rows of the labels file: the error regions only (`regions.is_error_region`); a
    region the classifier mostly gets right is no bug to label. With the oracle's `checks`
    ({region id: check}), rows carry oracle_label, oracle_agreement and ambiguous."""
    checks = checks or {}
    rows = []
    for r in regions.records:
        if not is_error_region(r):
            continue
        row = {k: r[k] for k in ("id", "num_codes", "weight", "source_label_counts",
                                 "pred_label_counts")}  # fmt: skip
        row["grid"] = RunDir.grid(r["id"])
        check = checks.get(r["id"])
        if check is not None:
            row.update(oracle_label=check["oracle_label"], oracle_agreement=check["agreement"],
                       ambiguous=check["ambiguous"])  # fmt: skip
        rows.append(row)
    return rows


def write_region_grids(ctx: Context, regions: Regions) -> None:
    """One PNG per region: decoded samples titled with the classifier's predictions."""
    if regions.num_regions == 0:
        return
    vae, clf = ctx.model("vae"), ctx.model("classifier")
    key = jax.random.fold_in(jax.random.key(ctx.config.distill.seed), 2)
    z = sample_regions(regions, key, ctx.config.grid_samples, tau=ctx.config.distill.tau)
    names = ctx.dataset.class_names
    # All regions in one call each: a call per region padded its 16 codes to a full batch of
    # `predict`, which took 2.5 s per region with the 28x28 conv models.
    flat = z.reshape(-1, z.shape[-1])
    images = np.asarray(jax.jit(models.decode)(vae, flat))
    images = images.reshape(*z.shape[:2], *images.shape[1:])
    preds = evaluation.predict(vae, clf, flat).reshape(z.shape[:2])
    for rec, region_images, pred in zip(regions.records, images, preds, strict=True):
        src, top_pred = top_pair(rec)
        # The codes' most common pair describes the search's errors; the samples shown are
        # drawn near the region's mean and may look otherwise, so the title says both.
        shown = np.bincount(pred, minlength=len(names))
        plots.save_image_grid(
            region_images,
            ctx.dir.rel(RunDir.grid(rec["id"])),
            titles=[f"pred {names[p]}" for p in pred],
            suptitle=f"region {rec['id']}: {rec['num_codes']} errors, most often "
            f"{names[src]} -> {names[top_pred]}; these samples: classifier says "
            f"{names[shown.argmax()]} ({shown.max()}/{len(pred)})",
        )


def stage_label(ctx: Context) -> dict[str, Any]:
    regions = load_regions(ctx.path("distill"))
    names = ctx.dataset.class_names
    path = ctx.dir.labels
    make_dirs(ctx.path("label"))
    rows = region_rows(regions)
    write_region_grids(ctx, regions)
    suggestions = labeling.label_by_source(rows) if rows else {}
    votes = oracle_votes(ctx, regions, [r["id"] for r in rows]) if ctx.config.uses_oracle else {}
    # The oracle checks the label each region is given (the oracle labeler: its own majority
    # vote) or offered (the source and manual labelers: the majority source label), so the
    # flag in the labels file, this log and the report speak of the same label.
    given = labeling.label_by_oracle(votes) if ctx.config.labeler == "oracle" else suggestions
    checks = validity.label_check(votes, given)
    if ctx.config.uses_oracle:
        write_json(ctx.dir.rel(ORACLE_CHECK_FILE), validity.as_json(checks))
        flagged = [rid for rid, c in checks.items() if c["ambiguous"]]
        why = (
            "no class gets half of the oracle's votes"
            if ctx.config.labeler == "oracle"
            else "the oracle disagrees with the suggested label on most samples"
        )
        ctx.log(
            f"oracle check: {len(flagged)} of {len(checks)} regions ambiguous ({why}) {flagged}"
        )
    rows = region_rows(regions, checks)
    if ctx.config.labeler == "manual":
        labeling.write_labels_file(path, rows, names, suggestions=suggestions)
    else:
        labeling.write_auto_labels(path, rows, names, given, labeler=ctx.config.labeler)
    answers = labeling.read_labels(path, region_ids=[r["id"] for r in rows], class_names=names)
    missing = [r["id"] for r in rows if r["id"] not in answers]
    if missing:
        raise LabelsPending(
            f"{len(missing)} of {len(rows)} regions await a label in {path} (regions "
            f"{missing[:10]}{'...' if len(missing) > 10 else ''}). Look at the grids in "
            f"{ctx.path('label')}, then fill in the file or run `defuse-jax label --out "
            f"{ctx.run_dir}`, and rerun the same command to continue."
        )
    labeled = sum(v is not None for v in answers.values())
    ctx.log(
        f"label ({ctx.config.labeler}): {labeled} regions labeled, {len(answers) - labeled} skipped"
    )
    return {
        "labeler": ctx.config.labeler,
        "num_labeled": labeled,
        "num_skipped": len(answers) - labeled,
        "num_ambiguous": sum(c["ambiguous"] for c in checks.values()),
    }


def oracle_votes(ctx: Context, regions: Regions, region_ids: list[int]) -> dict[int, np.ndarray]:
    """The oracle's predictions on `ORACLE_SAMPLES` fresh samples of each region (trains the
    oracle first, or reloads it when it is trained): {region id: [S] classes}."""
    if not region_ids:
        return {}
    oracle = train_oracle(ctx)
    key = jax.random.fold_in(jax.random.key(ctx.config.distill.seed), 3)
    z = sample_regions(regions, key, ORACLE_SAMPLES, tau=ctx.config.distill.tau)
    ids = sorted(region_ids)
    # One call over every region's samples (not one padded batch per region).
    pred = evaluation.predict(ctx.model("vae"), oracle, z[ids].reshape(-1, z.shape[-1]))
    return dict(zip(ids, pred.reshape(len(ids), -1), strict=True))


def saved_checks(ctx: Context) -> dict[int, validity.RegionCheck]:
    """The label stage's oracle check (label/oracle_check.json), or {} when there is none."""
    path = ctx.dir.rel(ORACLE_CHECK_FILE)
    return validity.from_json(read_json(path)) if os.path.exists(path) else {}


ORACLE_IDENTITY = "identity.json"  # in label/oracle/: what its models were trained on, and how


def oracle_shifts(ctx: Context) -> tuple[int, ...]:
    """The shifts the oracle's members train with (`RunConfig.oracle_shift`; unset:
    `train_models.oracle_shifts` of the image size), `oracle_members(ctx)` members at each."""
    shifts = ctx.config.oracle_shift
    return tm.oracle_shifts(ctx.dataset.image_shape) if shifts is None else shifts


def _oracle_settings(ctx: Context) -> tuple[ClassifierConfig, TrainConfig]:
    """The oracle members' model and training settings: wider than the classifier, trained
    longer, at the first of `oracle_shifts` (`train_ensemble` gives each member its own
    shift), with the classifier's seed + 1 (member k of each shift: + 1 + k)."""
    clf_train = training_lengths.train_epochs(
        ctx.config.classifier_train, training_lengths.CLASSIFIER_BUDGET, len(ctx.dataset.x_train)
    )
    train = dataclasses.replace(
        clf_train, epochs=training_lengths.oracle_epochs(clf_train), seed=clf_train.seed + 1,
        shift=oracle_shifts(ctx)[0],
    )  # fmt: skip
    return tm.oracle_classifier_config(ctx.dataset.image_shape), train


def oracle_identity(ctx: Context) -> dict[str, Any]:
    """What the oracle's models depend on: the data (by content), their model and training
    settings. Not the search, regions or labels, so a redone search or label stage keeps
    them; not the member count, since `tm.train_ensemble` reuses the members it has."""
    config, train = _oracle_settings(ctx)
    shifts = oracle_shifts(ctx)
    return {"data": ctx.dataset_sha256, "model": dataclasses.asdict(config),
            # (shift came after identity.json: oracles trained before it keep theirs)
            "train": fingerprint_fields(train, only=("shift",)),
            **({"shifts": list(shifts)} if len(shifts) > 1 else {})}  # fmt: skip


def oracle_is_current(ctx: Context, identity: Mapping[str, Any] | None = None) -> bool:
    """Whether label/oracle/ holds models of this run's `oracle_identity` (False when it holds
    none).

    An oracle from before identity.json is taken as current when its first member's
    config.json records the same model, training settings and data sizes (all an earlier
    version recorded), so that upgrading does not retrain it.
    """
    identity = json.loads(json.dumps(identity or oracle_identity(ctx)))
    path = ctx.path("label", "oracle", ORACLE_IDENTITY)
    if os.path.exists(path):
        return read_json(path) == identity
    legacy = ctx.path("label", "oracle", "config.json")
    if not os.path.exists(legacy):
        return False
    recorded = read_json(legacy)
    # config.json records every training setting, the identity leaves out a shift of 0
    train = without_later_defaults(recorded.get("train") or {}, TrainConfig, only=("shift",))
    now = {**identity, "data": tm.dataset_meta(ctx.dataset)}
    return all({**recorded, "train": train}.get(k) == v for k, v in now.items())


def train_oracle(ctx: Context) -> Params:
    """The oracle: `oracle_members(ctx)` classifiers per shift (`oracle_shifts`), wider than
    the run's and trained longer, with other seeds, averaged (`models.Ensemble`), in
    label/oracle/ (reloaded from their checkpoints when they are trained already).

    The oracle is trained once per data and settings (`oracle_identity`, recorded in
    label/oracle/identity.json): redoing the search or the label stage keeps it. Models of
    other data or settings are moved under <run>/stale/ first.
    """
    if "oracle" in ctx._models:
        return ctx._models["oracle"]
    out_dir = ctx.path("label", "oracle")
    identity = oracle_identity(ctx)
    if os.path.exists(out_dir) and not oracle_is_current(ctx, identity):
        dest = ctx.dir.new_stale("oracle")
        move(out_dir, dest)
        ctx.log(f"oracle: trained on other data or settings: moved to {dest}")
    write_json(os.path.join(out_dir, ORACLE_IDENTITY), identity)
    config, train = _oracle_settings(ctx)
    shifts, per_shift = oracle_shifts(ctx), oracle_members(ctx)
    members = per_shift * len(shifts)
    oracle = tm.train_ensemble(
        ctx.dataset, out_dir=out_dir, members=per_shift, config=config, train=train,
        shifts=shifts, progress=ctx.config.progress,
    )  # fmt: skip
    what = "oracle classifier" if members == 1 else f"oracle ({members} classifiers)"
    ctx.log(f"{what}: test accuracy {oracle.metrics['accuracy']:.4f}")
    ctx._models["oracle"] = oracle.params
    return oracle.params


def oracle_shift_groups(ctx: Context) -> list[Params]:
    """The oracle (`train_oracle`, trained first if it is not yet) as one ensemble per shift
    of `oracle_shifts`: the search's validity committee, whose every group must read the
    source class. One shift: [the oracle]."""
    oracle = train_oracle(ctx)
    groups = len(oracle_shifts(ctx))
    # the members already in memory, grouped as `train_ensemble` laid them out
    return [oracle] if groups == 1 else tm.shift_groups(models.ensemble_members(oracle), groups)


def oracle_members(ctx: Context) -> int:
    """`RunConfig.oracle_members`, or when unset: 1 when the oracle is a conv model and the
    run's classifier an MLP of ours (a stronger kind already), else 3."""
    if ctx.config.oracle_members is not None:
        return ctx.config.oracle_members
    shape = ctx.dataset.image_shape
    oracle_kind = tm.oracle_classifier_config(shape).kind
    classifier = ctx.config.classifier or tm.default_classifier_config(shape)
    stronger = ctx.own_classifier is None and (oracle_kind, classifier.kind) == ("conv", "mlp")
    return 1 if stronger else DEFAULT_ORACLE_MEMBERS


def read_answers(ctx: Context) -> dict[int, int | None]:
    regions = load_regions(ctx.path("distill"))
    return labeling.read_labels(
        ctx.dir.labels,
        region_ids=[r["id"] for r in regions.records if is_error_region(r)],
        class_names=ctx.dataset.class_names,
    )


def labels_damage(ctx: Context) -> str | None:
    """What makes the labels file unusable as the label stage's output, or None.

    A person may edit the file, so it has no digest: it must parse and list every region (a
    truncated file fails one or the other). The answers themselves are checked when the
    correction reads them, against the class names, naming the line of a bad one.
    """
    path = ctx.dir.labels
    if not os.path.isfile(path):
        return "missing"
    try:
        listed = labeling.listed_regions(path)
    except (labeling.LabelsFileError, UnicodeDecodeError) as e:
        return f"unreadable ({e})"
    expected = {r["id"] for r in load_regions(ctx.path("distill")).records if is_error_region(r)}
    problems = [
        f"{what} {_ids(ids)}"
        for what, ids in (
            ("no row for regions", expected - set(listed)),
            ("unknown regions", set(listed) - expected),
            ("regions listed twice", {r for r in listed if listed.count(r) > 1}),
        )
        if ids
    ]
    return ", ".join(problems) or None


def _ids(ids: set[int], most: int = 10) -> str:
    shown = sorted(ids)
    return str(shown[:most])[:-1] + (", ...]" if len(shown) > most else "]")


def _label_stage_current(ctx: Context) -> bool:
    """Whether the label stage finished with the run's configuration (its record's
    fingerprint), so a rerun keeps the labels file as it is."""
    path = ctx.dir.record("label")
    if not os.path.exists(path):
        return False
    return read_json(path).get("fingerprint") == ctx.fingerprints()["label"]


def set_labels(
    run_dir: str, config: RunConfig, answers: Mapping[int, str]
) -> dict[int, int | None]:
    """Record answers for some regions ({region id: class name, index or "skip"}).

    For notebooks and scripts; the terminal equivalent is `pipeline.label_interactively`.
    Answers already in the labels file for other regions are kept; rerun `run` afterwards to
    redo the correction.

    Returns:
        All answers now in the file.
    """
    ctx = Context(os.path.abspath(run_dir), config, print)
    if config.labeler != "manual" and not _label_stage_current(ctx):
        raise ValueError(
            f"{run_dir}'s label stage has not finished with this configuration, and its labeler "
            f"{config.labeler!r} would replace these answers when it does: run the pipeline "
            "first and set labels afterwards, or use the manual labeler."
        )
    regions = load_regions(ctx.path("distill"))
    rows, names = region_rows(regions, saved_checks(ctx)), ctx.dataset.class_names
    path = ctx.dir.labels
    ids = [r["id"] for r in rows]
    current = (
        labeling.read_labels(path, region_ids=ids, class_names=names)
        if os.path.exists(path)
        else {}
    )
    for rid, text in answers.items():
        if int(rid) not in ids:
            known = {r["id"] for r in regions.records}
            why = (
                "is not an error region (the classifier gets most of its samples right), so it "
                "is not labeled"
                if int(rid) in known
                else "is unknown"
            )
            raise ValueError(f"Region {rid} {why}; the error regions are {ids}.")
        value = labeling.parse_label(str(text), names)
        if value != labeling.UNLABELED:
            current[int(rid)] = value
    labeling.write_auto_labels(path, rows, names, current, labeler="manual")
    return labeling.read_labels(path, region_ids=ids, class_names=names)
