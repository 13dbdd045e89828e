"""Label validity: does a stronger, separately trained classifier (the oracle) agree with a
region's label on fresh samples from the region?

The oracle (`stages.label.train_oracle`: the default classifier for the image shape, twice as
wide, trained twice as long with another seed; by default an ensemble of three) stands in for a
careful person. For every region it classifies fresh codes drawn from the region; its
*agreement* with a label is the share of those samples it puts in that class. A region on whose
samples the oracle disagrees with the label most of the time (agreement below `AMBIGUOUS_BELOW`,
i.e. on more than half the samples) is flagged *ambiguous*: its samples may not show the labeled
class at all (they sit between classes, or the search drifted into another class), so correcting
the classifier towards that label is questionable. The flag is information only: no labeler
changes or drops a label because of it.

Two checks use it:

* `label_check`, in the label stage: the oracle against the label each region is given or
  offered (the oracle labeler's own majority vote; for the source and manual labelers, the
  majority source label suggested before anyone answers), so the labels file and the terminal
  labeler show the flag next to that label;
* `agreement_check`, in the evaluation: the oracle against each region's final label on the
  held-out region samples (the ones region accuracy is measured on), reported per region and
  overall in report.json / report.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

import numpy as np

# "Disagrees on most samples": agreement under one half.
AMBIGUOUS_BELOW: Final = 0.5


class RegionCheck(TypedDict):
    """The oracle's verdict on one region against one label."""

    label: int  # the label checked (the suggestion in the label stage, the answer later)
    oracle_label: int  # the oracle's majority vote on the region's samples (ties: smallest)
    agreement: float  # share of the samples the oracle classifies as `label`
    ambiguous: bool  # agreement < AMBIGUOUS_BELOW


class AgreementCheck(TypedDict):
    """The oracle against the final labels (`Report`'s oracle numbers come from here)."""

    per_region: dict[int, RegionCheck]  # labeled regions only
    agreement: float | None  # mean agreement over the labeled regions (None: none labeled)
    num_ambiguous: int
    oracle_test_accuracy: float | None  # the oracle's accuracy on the test split
    oracle_members: int | None  # classifiers the oracle averages (`RunConfig.oracle_members`)
    # the share of the classifier's test errors the oracle reads as their label (None: no
    # errors, or not measured); low means it shares the classifier's blind spots
    oracle_on_test_errors: float | None


def is_ambiguous(agreement: float) -> bool:
    """Whether the oracle disagrees with a label on most of a region's samples."""
    return float(agreement) < AMBIGUOUS_BELOW


def check_region(votes: np.ndarray, label: int) -> RegionCheck:
    """The oracle's verdict on one region.

    Args:
        votes: [S] int, the oracle's predicted classes on S fresh samples of the region.
        label: the class the region is (to be) labeled with.

    Raises:
        ValueError: empty or non-1-D votes, or votes that are not class indices.
    """
    votes = np.asarray(votes)
    if votes.ndim != 1 or votes.size == 0:
        raise ValueError(f"oracle votes must be a non-empty [S] array, got shape {votes.shape}.")
    if not np.issubdtype(votes.dtype, np.integer) or votes.min() < 0:
        raise ValueError(f"oracle votes must be class indices >= 0, got dtype {votes.dtype}.")
    agreement = float(np.mean(votes == int(label)))
    return RegionCheck(
        label=int(label),
        oracle_label=int(np.argmax(np.bincount(votes))),
        agreement=agreement,
        ambiguous=is_ambiguous(agreement),
    )


def label_check(
    votes: Mapping[int, np.ndarray], suggestions: Mapping[int, int]
) -> dict[int, RegionCheck]:
    """The label stage's check: the oracle against each region's given or suggested label.

    Args:
        votes: {region id: [S] oracle predictions on fresh samples of the region}.
        suggestions: {region id: class} (`labeling.label_by_source`, or the oracle labeler's
            `labeling.label_by_oracle`); regions without one are left out.

    Returns:
        {region id: `RegionCheck`}.
    """
    return {
        int(rid): check_region(votes[rid], suggestions[rid])
        for rid in votes
        if suggestions.get(rid) is not None
    }


def agreement_check(
    votes: Mapping[int, np.ndarray],
    labels: Mapping[int, int],
    *,
    oracle_test_accuracy: float | None = None,
    oracle_members: int | None = None,
    oracle_on_test_errors: float | None = None,
) -> AgreementCheck:
    """The evaluation's check: the oracle against each labeled region's label.

    Args:
        votes: {region id: [S] oracle predictions on held-out samples} for (at least) every
            labeled region.
        labels: {region id: class} of the labeled regions (skipped regions left out).
        oracle_test_accuracy, oracle_members, oracle_on_test_errors: the oracle's test
            accuracy, its number of classifiers and the share of the classifier's test errors
            it reads as their label, carried into the result.

    Returns:
        `AgreementCheck`: per labeled region, the mean agreement and the number flagged.

    Raises:
        ValueError: a labeled region without votes.
    """
    missing = sorted(set(labels) - set(votes))
    if missing:
        raise ValueError(f"No oracle votes for the labeled regions {missing}.")
    per_region = {int(rid): check_region(votes[rid], labels[rid]) for rid in sorted(labels)}
    agreements = [c["agreement"] for c in per_region.values()]
    return AgreementCheck(
        per_region=per_region,
        agreement=float(np.mean(agreements)) if agreements else None,
        num_ambiguous=sum(c["ambiguous"] for c in per_region.values()),
        oracle_test_accuracy=oracle_test_accuracy,
        oracle_members=oracle_members,
        oracle_on_test_errors=oracle_on_test_errors,
    )


def as_json(checks: Mapping[int, RegionCheck]) -> dict[str, Any]:
    """{"regions": {id as text: check}}: the label stage's label/oracle_check.json."""
    return {"ambiguous_below": AMBIGUOUS_BELOW, "regions": {str(k): v for k, v in checks.items()}}


def from_json(data: Mapping[str, Any]) -> dict[int, RegionCheck]:
    """Inverse of `as_json`."""
    return {int(k): RegionCheck(**v) for k, v in data["regions"].items()}
