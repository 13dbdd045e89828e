"""A person's blind audit of the bug yield: the ground truth the judges are checked against.

The bug yield (`bug_yield`) is a judge's reading of the search's error codes, and judges
disagree: on 28x28 digits a conv judge reads about half what the SVC reads, because a judge of
the classifier's family shares its blind spots. A person is the arbiter the method itself
assumes (a person labels the regions). The audit shows a person a random sample of the run's
kept error codes, decoded, mixed with a few images of known class that calibrate the person, all
shuffled and numbered, with no source, prediction or judge shown. The calibration images are
the VAE's reconstructions of test images (decoded from their codes, as the error codes are):
they look like the codes, so the person cannot tell them apart, and the person's accuracy on
them is the accuracy on images of that kind (real test images are sharper, and easier). Half of
them are reconstructions the classifier gets wrong, when it gets any wrong. The person writes
the class each image shows (or `skip`: no class can be told), and the score compares the
answers with the codes' source classes and with every judge's reading of the same images.

    sample = audit_sample(code_images, source, pred, known_images, labels, known_pred,
                          n_codes=100, n_known=20, seed=0)
    ... the person labels sample.images ...
    score_audit(sample, answers, {judge.name: judge.predict(sample.images)})

`defuse-jax audit --out RUN` writes the sheets and a blank `audit/labels.csv`, and scores it
once every row is answered (`audit/score.json`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from defuse_jax.files import atomic_write, make_dirs, read_json, write_json, write_npz
from defuse_jax.labeling.answers import UNLABELED, check_class_names, parse_label, valid_answers

SKIPPED = -1  # an answer of `skip`: the person can tell no class
UNANSWERED = -2  # an empty answer
PER_SHEET = 50  # images per PNG sheet (5 rows of 10)
HEADER = ("item", "label")


class AuditSample(NamedTuple):
    """What the person sees, in the order shown (item i is row i + 1 of the labels file)."""

    images: np.ndarray  # [n, H, W, C] in [0, 1]
    is_code: np.ndarray  # [n] bool: a kept error code (else an image of known class)
    truth: np.ndarray  # [n] int: a code's source class, a known image's label
    pred: np.ndarray  # [n] int: the classifier's prediction


def audit_sample(
    code_images: np.ndarray,
    code_source: np.ndarray,
    code_pred: np.ndarray,
    known_images: np.ndarray,
    known_labels: np.ndarray,
    known_pred: np.ndarray,
    *,
    n_codes: int = 100,
    n_known: int = 20,
    seed: int = 0,
) -> AuditSample:
    """A seeded sample to audit, shuffled: `n_codes` of the decoded error codes and `n_known`
    images of known class, half of them the classifier's errors (as many as it has).

    Args:
      code_images: [M, H, W, C] decoded error codes; code_source, code_pred: [M] their source
        classes and the classifier's predictions.
      known_images: [N, H, W, C] images of known class (the VAE's reconstructions of test
        images); known_labels: [N] their classes; known_pred: [N] the classifier's predictions.
      n_codes, n_known: how many of each (fewer when there are fewer).
      seed: the draw and the order.
    """
    if n_codes < 1 or n_known < 0:
        raise ValueError(f"An audit needs n_codes >= 1 and n_known >= 0, got {n_codes}, "
                         f"{n_known}.")  # fmt: skip
    if len(code_images) == 0:
        raise ValueError("The run kept no error codes: there is nothing to audit.")
    rng = np.random.default_rng(seed)
    codes = rng.choice(len(code_images), min(n_codes, len(code_images)), replace=False)
    labels, known_pred = np.asarray(known_labels), np.asarray(known_pred)
    wrong, right = np.flatnonzero(known_pred != labels), np.flatnonzero(known_pred == labels)
    n_wrong = min(len(wrong), n_known // 2)
    known = np.concatenate([
        rng.choice(wrong, n_wrong, replace=False),
        rng.choice(right, min(len(right), n_known - n_wrong), replace=False),
    ]).astype(np.int64)  # fmt: skip
    images = np.concatenate([np.asarray(code_images)[codes], np.asarray(known_images)[known]])
    is_code = np.arange(len(images)) < len(codes)
    truth = np.concatenate([np.asarray(code_source)[codes], labels[known]])
    pred = np.concatenate([np.asarray(code_pred)[codes], known_pred[known]])
    order = rng.permutation(len(images))
    return AuditSample(images[order], is_code[order], truth[order].astype(np.int64),
                       pred[order].astype(np.int64))  # fmt: skip


def wilson_interval(k: int, n: int, *, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval (95% by default) of a share k/n; None when n = 0."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _share(mask: np.ndarray) -> dict[str, Any]:
    k, n = int(mask.sum()), int(mask.size)
    return {"share": k / n if n else None, "count": k, "of": n, "interval": wilson_interval(k, n)}


def score_audit(
    sample: AuditSample, answers: np.ndarray, verdicts: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """The person's reading of the codes, the person's accuracy on the images of known class,
    and how far each judge agrees with the person.

    Args:
      sample: from `audit_sample`.
      answers: [n] the person's classes (`SKIPPED` for `skip`); no `UNANSWERED`.
      verdicts: {judge name: [n] its classes for sample.images}.

    Returns:
      {"codes": how many, "bug": the share of codes the person reads as their source class
      (skips count as no bug: an image that shows no class is no natural input), "class_change":
      read as the classifier's prediction, "skipped"; each {"share", "count", "of", "interval"
      (Wilson 95%)}; "person_on_known", "person_on_known_errors": the person's accuracy on the
      images of known class and on those the classifier gets wrong; "judges": {name: {"bug":
      its share on the same codes, "agrees_with_person": the share of the codes the person read
      (not skipped) it reads the same, "bug_call_agrees": the share of all codes where it and
      the person agree on bug or not, "on_known": its accuracy on the images of known
      class}}}.
    """
    answers = np.asarray(answers)
    if answers.shape != sample.truth.shape:
        raise ValueError(f"{answers.shape[0]} answers for {sample.truth.shape[0]} images.")
    if np.any(answers == UNANSWERED):
        raise ValueError(f"{int(np.sum(answers == UNANSWERED))} images are not answered yet.")
    code, known = sample.is_code, ~sample.is_code
    person_bug = answers[code] == sample.truth[code]
    read = code & (answers != SKIPPED)
    judges = {}
    for name, verdict in verdicts.items():
        verdict = np.asarray(verdict)
        judge_bug = verdict[code] == sample.truth[code]
        judges[name] = {
            "bug": _share(judge_bug)["share"],
            "agrees_with_person": _share(verdict[read] == answers[read])["share"],
            "bug_call_agrees": _share(judge_bug == person_bug)["share"],
            "on_known": _share(verdict[known] == sample.truth[known])["share"],
        }
    known_wrong = known & (sample.pred != sample.truth)
    return {
        "codes": int(code.sum()),
        "bug": _share(person_bug),
        "class_change": _share(answers[code] == sample.pred[code]),
        "skipped": _share(answers[code] == SKIPPED),
        "person_on_known": _share(answers[known] == sample.truth[known]),
        "person_on_known_errors": _share(answers[known_wrong] == sample.truth[known_wrong]),
        "judges": judges,
    }


# -- files: <run>/audit/ ---------------------------------------------------------------------


def write_labels_template(path: str, n: int) -> None:
    """A blank labels file: one row per image, `item` 1..n, `label` to fill in."""
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows([i, ""] for i in range(1, n + 1))


def read_answers(path: str, n: int, class_names: Sequence[str]) -> np.ndarray:
    """The answers [n] in the labels file (`UNANSWERED` where empty, `SKIPPED` for `skip`).

    Raises:
      ValueError: a missing or repeated item, an unknown item, or an answer that is no class
        (the message names the line and what may be written).
    """
    names = check_class_names(class_names)
    answers = np.full(n, UNANSWERED, np.int64)
    seen: set[int] = set()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if header[:2] != list(HEADER):
            raise ValueError(f"{path}: the header must be {','.join(HEADER)}, got {header}.")
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            where = f"{path}, line {reader.line_num}"
            item = cells[0].strip()
            if not item.isdigit() or not 1 <= int(item) <= n or int(item) in seen:
                raise ValueError(f"{where}: item {item!r} is not one of 1..{n} or is repeated.")
            seen.add(int(item))
            try:
                value = parse_label(cells[1] if len(cells) > 1 else "", names)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if value != UNLABELED:
                answers[int(item) - 1] = SKIPPED if value is None else value
    if len(seen) != n:
        missing = sorted(set(range(1, n + 1)) - seen)[:10]
        raise ValueError(f"{path}: items {missing} are missing; every item 1..{n} needs a row.")
    return answers


def write_audit(
    directory: str,
    sample: AuditSample,
    verdicts: Mapping[str, np.ndarray],
    class_names: Sequence[str],
) -> list[str]:
    """The sheets (`sheet_1.png`, ...: numbered images, nothing else shown), the key
    (`key.npz`: what each image is and every judge's reading; not for the person's eyes) and the
    blank `labels.csv`. Returns the sheets' paths."""
    from defuse_jax.plots import save_image_grid

    make_dirs(directory)
    names = list(verdicts)
    write_npz(os.path.join(directory, "key.npz"), images=sample.images, is_code=sample.is_code,
              truth=sample.truth, pred=sample.pred,
              verdicts=np.stack([np.asarray(verdicts[k]) for k in names]).astype(np.int64),
              judges=np.asarray(names), class_names=np.asarray(class_names))  # fmt: skip
    legend = "  ".join(f"{i}={c}" for i, c in enumerate(class_names))
    sheets = []
    for s, start in enumerate(range(0, len(sample.images), PER_SHEET)):
        stop = min(start + PER_SHEET, len(sample.images))
        sheets.append(save_image_grid(
            sample.images[start:stop], os.path.join(directory, f"sheet_{s + 1}.png"),
            ncols=10, titles=[f"#{i}" for i in range(start + 1, stop + 1)], cell=112,
            suptitle=f"Which class does each image show? {legend}  (or skip)",
        ))  # fmt: skip
    write_labels_template(os.path.join(directory, "labels.csv"), len(sample.images))
    return sheets


def read_audit(directory: str) -> tuple[AuditSample, dict[str, np.ndarray], tuple[str, ...]]:
    """The sample, the judges' verdicts and the class names `write_audit` saved."""
    with np.load(os.path.join(directory, "key.npz"), allow_pickle=False) as z:
        sample = AuditSample(z["images"], z["is_code"], z["truth"], z["pred"])
        verdicts = dict(zip((str(k) for k in z["judges"]), z["verdicts"], strict=True))
        return sample, verdicts, tuple(str(c) for c in z["class_names"])


def format_score(score: Mapping[str, Any]) -> str:
    """The score as a few lines of text."""

    def pct(share: Mapping[str, Any]) -> str:
        if share["share"] is None:
            return "n/a"
        lo, hi = share["interval"]
        return f"{share['share']:.1%} ({share['count']}/{share['of']}, 95% {lo:.0%}-{hi:.0%})"

    lines = [
        f"person's bug yield: {pct(score['bug'])}; class changes {pct(score['class_change'])}; "
        f"skipped {pct(score['skipped'])}",
        f"person on the images of known class: {pct(score['person_on_known'])}, on those the "
        f"classifier gets wrong {pct(score['person_on_known_errors'])}",
    ]
    for name, j in score["judges"].items():
        agree = j["agrees_with_person"]
        lines.append(
            f"judge {name}: bug yield {j['bug']:.1%} on the same codes; reads "
            + (f"{agree:.1%}" if agree is not None else "n/a")
            + f" of the person's readings alike; bug-or-not agrees on {j['bug_call_agrees']:.1%};"
            + (f" {j['on_known']:.1%} right on the images of known class"
               if j["on_known"] is not None else "")
        )  # fmt: skip
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The first call draws the sample and writes <run>/audit/ (sheets, key, a blank "
        "labels.csv); later calls score labels.csv once every row is answered. --codes, "
        "--known and --seed act on the first call only: move <run>/audit/ away to draw anew."
    )
    p.add_argument("--out", required=True, help="a finished run directory")
    p.add_argument("--codes", type=int, default=100, help="error codes to show (default 100)")
    p.add_argument("--known", type=int, default=20,
                   help="images of known class mixed in to calibrate the person: the VAE's "
                   "reconstructions of test images, half of them ones the classifier gets wrong "
                   "(default 20)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the sample's draw and order")


def prepare(run_dir: str, *, n_codes: int, n_known: int, seed: int) -> list[str]:
    """Draws the sample of a finished run and writes `<run>/audit/` (`write_audit`) with the
    candidate judges' readings (those the evaluate stage chose from)."""
    from defuse_jax import bug_yield, evaluation, identification, stage_context
    from defuse_jax.run_dir import RunDir

    search = os.path.join(run_dir, "search", "errors.npz")
    if not os.path.exists(RunDir(run_dir).config) or not os.path.exists(search):
        raise ValueError(f"{run_dir} holds no searched run: run `defuse-jax search --out "
                         f"{run_dir}` (or `run`) first.")  # fmt: skip
    if n_codes < 1 or n_known < 0:
        raise ValueError(f"--codes must be >= 1 and --known >= 0, got {n_codes}, {n_known}.")
    # The run's models as its stages load them (the user's own ones too, by their entry points).
    ctx = stage_context.of_run(run_dir)
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    errors = identification.load_errors(os.path.join(run_dir, "search"))
    if len(errors["z"]) == 0:
        raise ValueError(f"{run_dir}'s search kept no error codes: there is nothing to audit.")
    # Only the codes shown are decoded (audit_sample shuffles them with the images of known class).
    pick = np.sort(np.random.default_rng(seed).permutation(len(errors["z"]))[:n_codes])
    images = evaluation.decode(vae, np.asarray(errors["z"])[pick])
    # Reconstructions decoded from the test images' codes as the search encodes its sources.
    known = evaluation.decode(vae, identification.encode_sources(vae, ds.x_test, ds.y_test))
    sample = audit_sample(images, errors["source_label"][pick], errors["pred_label"][pick],
                          known, ds.y_test, evaluation.classify(clf, known), n_codes=n_codes,
                          n_known=n_known, seed=seed)  # fmt: skip
    test_pred = np.asarray(evaluation.classify(clf, ds.x_test))
    choice = bug_yield.judge_for(ds, test_pred, cache_dir=os.path.join(run_dir, "cache", "judge"),
                                 seed=config.data.seed, train=config.classifier_train)  # fmt: skip
    verdicts = {j.name: np.asarray(j.predict(sample.images)) for j in choice.candidates}
    return write_audit(os.path.join(run_dir, "audit"), sample, verdicts, ds.class_names)


def run(args: argparse.Namespace) -> int:
    """`defuse-jax audit`: write the sheets, or score the answered labels file."""
    directory = os.path.join(args.out, "audit")
    labels = os.path.join(directory, "labels.csv")
    if not os.path.exists(labels):
        sheets = prepare(args.out, n_codes=args.codes, n_known=args.known, seed=args.seed)
        print(f"Wrote {', '.join(sheets)}.\nWrite the class each numbered image shows in "
              f"{labels} (a class name or index, or 'skip'), then rerun this command.")  # fmt: skip
        return 0
    try:
        score = score_directory(directory)
    except AuditPending as e:
        print(e, file=sys.stderr)
        return 3
    print(format_score(score))
    return 0


class AuditPending(ValueError):
    """The audit's labels file still has empty rows."""


def score_directory(directory: str) -> dict[str, Any]:
    """Scores `write_audit`'s `directory` (`score_audit`) once its labels.csv is answered, and
    writes the score to score.json.

    Raises:
      AuditPending: rows are still empty (the message says how many and what to write).
      ValueError: a bad labels file (`read_answers`).
    """
    sample, verdicts, names = read_audit(directory)
    labels = os.path.join(directory, "labels.csv")
    answers = read_answers(labels, len(sample.truth), names)
    left = int(np.sum(answers == UNANSWERED))
    if left:
        raise AuditPending(f"{left} of {len(answers)} images are not answered yet in {labels} "
                           f"({valid_answers(names)}).")  # fmt: skip
    score = score_audit(sample, answers, verdicts)
    write_json(os.path.join(directory, "score.json"), score)
    return score


def read_score(run_dir: str) -> dict[str, Any] | None:
    """The audit's score of a run, if it has one."""
    path = os.path.join(run_dir, "audit", "score.json")
    return read_json(path) if os.path.exists(path) else None
