"""`defuse-jax run`: all Defuse stages in one resumable run directory (`run_dir.RunDir` says
where each file lives).

Every stage writes `<stage>/stage.json` last, once all its outputs are written (each atomically,
`files.atomic_write`): the fingerprint of its configuration and of every stage upstream, the
SHA-256 digest of every output (`STAGE_OUTPUTS`) and the id of the completion of the stage before
it. A rerun skips a stage only while all of that still holds: same fingerprint, computed from the
stage before as it stands, every output present with the bytes the stage wrote. Otherwise it
redoes the stage; interrupted stages resume (training from its checkpoints), outputs of a changed
configuration or of a redone stage upstream are moved aside first, and so are damaged outputs
(missing, truncated, altered; with the stage's record), so nothing computed (labels above all) is
ever lost.

Over several processes (`run(..., distributed=True)`, `defuse_jax.distributed`) every process
runs every stage on the devices of all of them; process 0 alone writes the run directory.

Example:
    >>> from defuse_jax.pipeline import RunConfig, run
    >>> report = run("runs/digits", RunConfig())["evaluate"]  # a `report.Report`
    >>> report["region_accuracy_after"]
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jax

from defuse_jax import distributed as dist
from defuse_jax import (
    labeling,
    own_model,
)
from defuse_jax.data import Dataset, check_available, train_size
from defuse_jax.files import move, read_json, sha256, write_json
from defuse_jax.regions import load_regions
from defuse_jax.run_config import (
    STAGES,
    RunConfig,
    lengths_of,
    load_run_config,
    resolved_lengths,
)
from defuse_jax.run_dir import RunDir, check_not_a_file
from defuse_jax.stage_context import Context, LabelsPending  # noqa: F401 - re-exported
from defuse_jax.stages.correct import stage_correct
from defuse_jax.stages.distill import stage_distill
from defuse_jax.stages.evaluate import build_report, stage_evaluate  # noqa: F401 - public
from defuse_jax.stages.label import (  # noqa: F401 - the public API of a run directory
    labels_damage,
    oracle_is_current,
    read_answers,
    region_rows,
    saved_checks,
    set_labels,
    stage_label,
    train_oracle,
)
from defuse_jax.stages.search import stage_search
from defuse_jax.stages.train import stage_train

# --------------------------------------------------------------------------------------------
# Stages (`defuse_jax.stages`, one module each). Each returns a JSON-able summary stored in
# <stage>/stage.json.

STAGE_FNS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "train": stage_train,
    "search": stage_search,
    "distill": stage_distill,
    "label": stage_label,
    "correct": stage_correct,
    "evaluate": stage_evaluate,
}

# The files a finished stage leaves behind (globs relative to the run directory; `**` reaches
# into the Orbax checkpoints' step directories). Its record keeps their SHA-256 digests, and a
# rerun trusts the stage only while every one is still there with those bytes: a damaged model
# is found before anything restores it. Not listed: the labels file, which a person may edit:
# it is checked by reading it (`stages.label.labels_damage`).
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "train": ("train/vae/config.json", "train/vae/history.json", "train/vae/reconstructions.png",
              "train/vae/ckpt/**", "train/classifier/config.json",
              "train/classifier/history.json", "train/classifier/ckpt/**"),
    "search": ("search/errors.npz", "search/summary.json"),
    "distill": ("distill/regions.npz", "distill/regions.json"),
    "label": ("label/region_*.png", "label/oracle/config.json", "label/oracle/history.json",
              "label/oracle/ckpt/**", "label/oracle/ensemble.json", "label/oracle/identity.json",
              "label/oracle/member*/config.json", "label/oracle/member*/history.json",
              "label/oracle/member*/ckpt/**", "label/oracle_check.json"),
    "correct": ("correct/classifier/config.json", "correct/classifier/ckpt/**",
                "correct/classifier/own_params/**",
                "correct/classifier/control/config.json", "correct/classifier/control/ckpt/**"),
    "evaluate": ("report.json", "report.md", "plots/*.png"),
}  # fmt: skip
# A checkpoint's step directory (`.../ckpt/<step>`): damage to any file in it sets the whole
# step aside, so that training resumes from an intact earlier step, or starts again.
_CHECKPOINT_STEP = re.compile(r"^(.*/ckpt/\d+)/")


# --------------------------------------------------------------------------------------------


def run(
    run_dir: str,
    config: RunConfig = RunConfig(),  # noqa: B008 - frozen
    *,
    until: str = "evaluate",
    log: Callable[[str], None] = print,
    dataset: Dataset | None = None,
    classifier: Any = None,
    vae: Any = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the stages up to and including `until`.

    Args:
        run_dir: the run directory (created if missing).
        config: the run's configuration.
        until: the last stage to run.
        log: where progress lines go (prefixed with "[process i of n] " on every process but
            process 0 of a distributed run).
        dataset: the dataset, if already loaded (default: loaded from `config.data`).
        classifier: the user's own classifier to debug instead of training the project's
            (`own_model.as_classifier`: an NNX module, `(linen_module, variables)` or
            `(apply_fn, params)`, or what `as_classifier` made of one, with its `preprocess`
            and `frozen` weights). Pass it on every call for this run directory: its identity
            is in every stage's fingerprint. Its corrected weights go to
            correct/classifier/own_params/ in its own structure (`own_model.save_user_params`).
        vae: the generative model to search with instead of training one
            (`own_model.as_vae`: the project's VAE params, or `(encode_fn, decode_fn, params)`);
            pass it on every call too.
        distributed: join the processes of a multi-host run first
            (`distributed.initialize()`, which detects the cluster; call it yourself with the
            coordinator's address for an explicit launch). Every process must call `run` with
            the same arguments, and `run_dir` must be one shared directory.

    Returns:
        {stage: its summary} for every stage run or found done; the evaluate stage's summary
        is the run's `report.Report` (the content of report.json), so
        `run(run_dir, config)["evaluate"]` is the report.

    Raises:
        LabelsPending: the manual labeler still waits for labels (rerun once they are in).
    """
    if until not in STAGES:
        raise ValueError(f"Unknown stage {until!r}; stages are {', '.join(STAGES)}.")
    if "://" in os.fspath(run_dir):
        raise ValueError(
            f"The run directory {run_dir} is a URL: run directories are local or shared file "
            "system paths (bucket paths such as gs:// are not supported). Mount the bucket "
            "(e.g. gcsfuse) and pass the mount's path."
        )
    check_not_a_file(run_dir)
    try:
        saved = load_run_config(run_dir)
    except (ValueError, TypeError, KeyError):  # unreadable: treated as new, and overwritten
        saved = None
    if dataset is None and (saved is None or saved.data != config.data):
        # A new data config is checked before it is saved or any output set aside; one the
        # run already used is not (its data may be gone while every stage is done).
        check_available(config.data)
    if distributed:
        dist.initialize()
    if dist.is_distributed():
        dist.check_shared_directory(os.path.abspath(run_dir))
        if not dist.is_main():
            log = _prefixed(log, f"[{dist.describe()}] ")
        log(f"[distributed] {dist.describe()}, {jax.device_count()} devices in all")
    own = own_model.own_models(config, classifier=classifier, vae=vae)
    if own and dist.is_distributed():
        raise ValueError(
            "Your own classifier or VAE is not supported over several processes yet (its "
            "corrected weights are saved by one process). Run on one host: every local device "
            "is used."
        )
    config = resolve_lengths(run_dir, config, dataset)
    ctx = Context(os.path.abspath(run_dir), config, log, _dataset=dataset, own_models=own)
    _check_own_models(ctx)
    summaries: dict[str, Any] = {}
    upstream: str | None = None  # id of the completion of the stage before (None: first stage)
    for stage in STAGES[: STAGES.index(until) + 1]:
        # Recomputed per stage: the correction's fingerprint covers the labels file's content.
        fp = ctx.fingerprints()[stage]
        record = _completed(ctx, stage, fp, upstream)
        if record is not None:
            summaries[stage] = record["summary"]
            upstream = record.get("id")  # records from before ids were kept: None
            log(f"[{stage}] done earlier, skipped")
            continue
        write_json(ctx.dir.started(stage), {"fingerprint": fp})
        log(f"[{stage}] running")
        t0 = time.perf_counter()
        summary = STAGE_FNS[stage](ctx)
        completion = uuid.uuid4().hex
        # Written last: a stage is complete only once this record exists.
        write_json(
            ctx.dir.record(stage),
            {"fingerprint": fp, "seconds": time.perf_counter() - t0, "summary": summary,
             "id": completion, "upstream": upstream, "outputs": _digests(ctx, stage)}
        )  # fmt: skip
        summaries[stage], upstream = summary, completion
    return summaries


def _check_own_models(ctx: Context) -> None:
    """Before any stage: the user's models serve on the dataset's images, and a run directory
    that debugged a user's model is not silently given the project's instead."""
    if ctx.own_models:
        ds = ctx.dataset
        if "classifier" in ctx.own_models:
            own_model.check_classifier(ctx.own_classifier, ds.x_test[:8], ds.num_classes)
        if "vae" in ctx.own_models:
            own_model.check_vae(ctx.own_models["vae"], ds.x_test[:8], ds.y_test[:8])
    try:
        record = _read_record(ctx.dir.record("train"))
    except _UnreadableRecord:
        return
    summary = (record or {}).get("summary") or {}
    for name in ("classifier", "vae"):
        own = summary.get(f"own_{name}")
        if own and name not in ctx.own_models:
            raise ValueError(
                f"{ctx.run_dir} debugs with your {name} {own['name']} (weights sha256 "
                f"{own['sha256'][:12]}), but none was given: pass it again ({name}=, or "
                f"--{name}-fn), or start a new run directory for the project's own {name}."
            )


def _prefixed(log: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda line: log(prefix + line)


class _UnreadableRecord(Exception):
    """A stage record that exists but cannot be read (truncated, or not a stage record)."""


def _read_record(path: str) -> dict[str, Any] | None:
    """A stage's stage.json or started.json, or None if there is none.

    Raises:
        _UnreadableRecord: the file exists but is no readable record.
    """
    if not os.path.exists(path):
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding errors
        raise _UnreadableRecord(path) from e
    if not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)):
        raise _UnreadableRecord(path)
    return record


def _completed(ctx: Context, stage: str, fp: str, upstream: str | None) -> dict[str, Any] | None:
    """The record of `stage` if it is complete and current; else readies the stage for a redo.

    Complete and current: its record is readable, has fingerprint `fp`, was computed from the
    completion `upstream` of the stage before, and every output is intact. Otherwise what is
    outdated or damaged is moved under <run>/stale/ (never deleted) and None is returned.
    """
    try:
        record = _read_record(ctx.dir.record(stage))
        started = None if record is not None else _read_record(ctx.dir.started(stage))
    except _UnreadableRecord as e:
        # Nothing tells which configuration the outputs belong to: keep them all aside.
        _move_aside(ctx, stage, f"its record {os.path.relpath(str(e), ctx.run_dir)} is unreadable")
        return None
    if record is None:
        if started is not None and started["fingerprint"] != fp:
            # Begun with another configuration. A directory without these files, e.g. from
            # `defuse-jax train-vae`, is reused: training checks its own checkpoints.
            _move_aside(ctx, stage, "configuration changed")
        return None
    if record["fingerprint"] != fp:
        _move_aside(ctx, stage, "configuration changed")
        return None
    if record.get("upstream") != upstream:
        _move_aside(ctx, stage, f"{STAGES[STAGES.index(stage) - 1]} was redone")
        return None
    damaged = _damaged_outputs(ctx, stage, record)
    if damaged:
        _set_aside_damaged(ctx, stage, damaged)
        return None
    return record


def _digests(ctx: Context, stage: str) -> dict[str, str]:
    """{path relative to the run directory: SHA-256} of the outputs `stage` left."""
    out = {}
    for pattern in STAGE_OUTPUTS[stage]:
        for path in sorted(glob.glob(ctx.path(pattern), recursive=True)):
            if os.path.isfile(path):
                out[os.path.relpath(path, ctx.run_dir).replace(os.sep, "/")] = sha256(path)
    return out


def _damaged_outputs(ctx: Context, stage: str, record: Mapping[str, Any]) -> dict[str, str]:
    """{output (relative path): what is wrong with it} for the outputs of a finished stage."""
    damaged = {}
    # Records written before digests were kept list no outputs: nothing to compare them with.
    for rel, digest in (record.get("outputs") or {}).items():
        path = ctx.path(*rel.split("/"))
        if not os.path.isfile(path):
            damaged[rel] = "missing"
        elif sha256(path) != digest:
            damaged[rel] = "changed since the stage wrote it"
    if stage == "label":
        problem = labels_damage(ctx)
        if problem:
            damaged["label/labels.csv"] = problem
    return damaged


def save_run_config(
    run_dir: str, config: RunConfig, *, lengths: Mapping[str, Any] | None = None
) -> None:
    """Remember the run's configuration in <run>/config.json (the CLI's defaults next time),
    with the training lengths it resolved to (`run_config.lengths_of`) under "lengths"."""
    record = dataclasses.asdict(config)
    if lengths is not None:
        record["lengths"] = dict(lengths)
    write_json(RunDir(run_dir).config, record)


def resolve_lengths(run_dir: str, config: RunConfig, dataset: Dataset | None = None) -> RunConfig:
    """`config` with its unset training lengths derived from the training split's size
    (`training_lengths`), saved into config.json as given plus the lengths it resolved to.

    The size comes from `dataset`, else from the data's files. When those are gone (a run
    whose every stage is done), the lengths recorded in config.json are used again.
    """
    try:
        n_train = len(dataset.x_train) if dataset is not None else train_size(config.data)
    except (ValueError, OSError):
        path = RunDir(run_dir).config
        recorded = (read_json(path).get("lengths") or {}) if os.path.exists(path) else {}
        if "num_train" not in recorded:
            raise
        n_train = recorded["num_train"]
    resolved = resolved_lengths(config, n_train)
    save_run_config(run_dir, config, lengths=lengths_of(resolved, n_train))
    return resolved


def _move_aside(ctx: Context, stage: str, reason: str) -> None:
    """Keep the outputs of an outdated stage (configuration changed, ...) under <run>/stale/.

    The oracle in label/oracle/ stays while it is current (`stages.label.oracle_is_current`):
    it depends on the data and its own settings only, not on the search, the regions or the
    labels, and a validity search has just used it.
    """
    dest = ctx.dir.new_stale(stage)
    if stage == "label" and oracle_is_current(ctx):
        for name in sorted(os.listdir(ctx.path(stage))):
            if name != "oracle":
                move(ctx.path(stage, name), os.path.join(dest, name))
    else:
        move(ctx.path(stage), dest)
    ctx.log(f"[{stage}] {reason}: previous outputs moved to {dest}")


def _set_aside_damaged(ctx: Context, stage: str, damaged: Mapping[str, str]) -> None:
    """Move damaged outputs and the stage's record under <run>/stale/; the stage is then redone
    in place, so what it resumes from stays (training's checkpoints, a person's labels file)."""
    dest = ctx.dir.new_stale(stage)
    # The labels file stays: the label stage rewrites it keeping every answer (or naming the
    # malformed line), and an automatic labeler keeps a .bak copy when the answers differ.
    moving = [rel for rel in damaged if rel != "label/labels.csv"] + [f"{stage}/stage.json"]
    # A damaged checkpoint file goes with its whole step directory.
    moving = list(dict.fromkeys(
        m.group(1) if (m := _CHECKPOINT_STEP.match(rel)) else rel for rel in moving
    ))  # fmt: skip
    moved = []
    for rel in moving:
        src = ctx.path(*rel.split("/"))
        if not os.path.exists(src):
            continue
        inside = rel.split("/", 1)[1] if rel.startswith(f"{stage}/") else rel
        target = os.path.join(dest, *inside.split("/"))
        move(src, target)
        moved.append(rel)
    what = "; ".join(f"{rel} {why}" for rel, why in damaged.items())
    ctx.log(
        f"[{stage}] damaged output ({what}): {', '.join(moved)} moved to {dest}; redoing the stage"
    )


def label_interactively(
    run_dir: str,
    config: RunConfig,
    *,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., None] = print,
    classifier: Any = None,
    vae: Any = None,
) -> dict[int, int | None]:
    """Walk a person through the unlabeled regions (runs the stages up to distill first;
    `classifier` and `vae`: the user's own models, as `run` takes them).

    Raises:
        ValueError: the run labels its regions automatically (`config.labeler` is not
            "manual"): the label stage would replace the answers.
    """
    if config.labeler != "manual":
        raise ValueError(
            f"{run_dir} labels its regions automatically (labeler {config.labeler!r}), so the "
            "label stage would replace answers typed here. To label by hand, add --labeler "
            "manual (saved with the run; an automatic label stage is then set aside and every "
            "region asked). To change a few labels of a finished run, edit their cells in "
            f"{RunDir(run_dir).labels} and rerun `defuse-jax run --out {run_dir}`."
        )
    # Through the label stage itself: an outdated one (e.g. an automatic labeler's) is set aside
    # first, and the stage writes the grids, the oracle's check and the labels file to answer in.
    try:
        run(run_dir, config, until="label", log=print_fn, classifier=classifier, vae=vae)
    except LabelsPending:
        pass  # the regions this session asks
    own = own_model.own_models(config, classifier=classifier, vae=vae)
    ctx = Context(os.path.abspath(run_dir), config, print_fn, own_models=own)
    regions = load_regions(ctx.path("distill"))
    if regions.num_regions == 0:
        print_fn("No regions to label: the search found too few errors.")
        return {}
    rows = region_rows(regions, saved_checks(ctx))  # the flag shown next to each suggestion
    return labeling.interactive_label(
        ctx.dir.labels,
        rows,
        ctx.dataset.class_names,
        run_dir=ctx.run_dir,
        input_fn=input_fn,
        print_fn=print_fn,
    )
