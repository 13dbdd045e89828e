"""Label validity: the oracle's agreement with region labels, the ambiguous flag, and how the
labels file and the terminal labeler show it."""

import csv

import numpy as np
import pytest

from defuse_jax import label_validity, labeling
from defuse_jax.labeling.labels_file import ORACLE_COLUMNS

NAMES = [str(i) for i in range(10)]


def test_agreement_and_ambiguous_flag():
    votes = {
        0: np.array([3, 3, 3, 5]),  # agrees with label 3 on 3 of 4
        1: np.array([7, 7, 7, 1]),  # labeled 1, the oracle mostly says 7: ambiguous
        2: np.array([2, 4, 2, 4]),  # exactly half: not "most samples", not ambiguous
    }
    check = label_validity.agreement_check(
        votes, {0: 3, 1: 1, 2: 2}, oracle_test_accuracy=0.9, oracle_members=3
    )
    per = check["per_region"]
    assert [per[i]["agreement"] for i in (0, 1, 2)] == [0.75, 0.25, 0.5]
    assert [per[i]["ambiguous"] for i in (0, 1, 2)] == [False, True, False]
    assert per[1]["oracle_label"] == 7 and per[2]["oracle_label"] == 2  # ties: smallest class
    assert check["agreement"] == pytest.approx(0.5) and check["num_ambiguous"] == 1
    assert check["oracle_test_accuracy"] == 0.9 and check["oracle_members"] == 3
    empty = label_validity.agreement_check(votes, {})
    assert empty["agreement"] is None and empty["num_ambiguous"] == 0
    with pytest.raises(ValueError, match=r"No oracle votes for the labeled regions \[9\]"):
        label_validity.agreement_check(votes, {9: 0})
    with pytest.raises(ValueError, match="non-empty"):
        label_validity.check_region(np.array([], np.int32), 0)
    checks = label_validity.label_check(votes, {0: 5, 1: 7})  # region 2 has no suggestion
    assert set(checks) == {0, 1} and checks[0]["ambiguous"] and not checks[1]["ambiguous"]
    assert label_validity.from_json(label_validity.as_json(checks)) == checks


def _regions(with_oracle):
    regions = [
        {"id": 0, "num_codes": 20, "source_label_counts": [0, 0, 20] + [0] * 7},
        {"id": 4, "num_codes": 12, "source_label_counts": [0, 12] + [0] * 8},
    ]
    if with_oracle:
        regions[0].update(oracle_label=2, oracle_agreement=0.9, ambiguous=False)
        regions[1].update(oracle_label=7, oracle_agreement=0.125, ambiguous=True)
    return regions


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_file_and_terminal_show_the_flag(tmp_path):
    path = tmp_path / "labels.csv"
    regions = _regions(with_oracle=True)
    # The source labeler keeps ambiguous regions' labels; the file shows the flag.
    labeling.write_auto_labels(path, regions, NAMES, labeling.label_by_source(regions),
                               labeler="source")  # fmt: skip
    rows = _rows(path)
    assert [(r["label"], r["oracle"], r["oracle_agreement"], r["ambiguous"]) for r in rows] == [
        ("2", "2", "0.90", ""),
        ("1", "7", "0.12", "yes"),
    ]
    # The manual labeler's template and the terminal session show it too.
    manual = tmp_path / "manual.csv"
    labeling.write_labels_file(manual, regions, NAMES)
    assert [r["ambiguous"] for r in _rows(manual)] == ["", "yes"]
    printed = []
    answers = iter(["2", "1"])
    labeling.interactive_label(
        manual,
        regions,
        NAMES,
        input_fn=lambda _: next(answers),
        print_fn=lambda *a: printed.append(" ".join(map(str, a))),
    )
    text = "\n".join(printed)
    assert text.count("AMBIGUOUS") == 1
    region_4 = text[text.index("Region 4") :]
    assert "says 7; on 12% of fresh samples" in region_4 and "AMBIGUOUS" in region_4
    # Rewritten without the oracle's check (e.g. oracle_check turned off), no stale verdict stays.
    labeling.write_labels_file(manual, _regions(with_oracle=False), NAMES)
    assert not set(ORACLE_COLUMNS) & set(_rows(manual)[0])
    assert [r["label"] for r in _rows(manual)] == ["2", "1"]  # answers kept
