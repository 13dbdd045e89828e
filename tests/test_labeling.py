"""Labeling stage: answer parsing, the labels file, automatic labelers, interactive sessions."""

from __future__ import annotations

import csv
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from test_correction_selection import _problem, _tiny_models

from defuse_jax import evaluation, plots
from defuse_jax.labeling import (
    HEADER,
    SKIP,
    UNLABELED,
    LabelsFileError,
    interactive_label,
    label_by_oracle,
    label_by_source,
    parse_label,
    read_labels,
    write_auto_labels,
    write_labels_file,
)
from defuse_jax.regions import sample_regions
from defuse_jax.stages import label as label_stage

DIGITS = tuple(str(i) for i in range(10))
SMILE = ("not_smiling", "smiling")
ODD = ("Cat", "cat", "3", "5", "Dog")  # case clash and digit names that are not their indices


def _region(rid, source, pred, num_codes=None, weight=0.1, num_classes=10):
    src = [0] * num_classes
    src[source] = num_codes or 10
    prd = [0] * num_classes
    prd[pred] = num_codes or 10
    return {
        "id": rid,
        "num_codes": num_codes or 10,
        "weight": weight,
        "source_label_counts": src,
        "pred_label_counts": prd,
        "grid": f"label/region_{rid:03d}.png",
    }


REGIONS = [_region(3, 2, 7, 120, 0.08), _region(0, 6, 1, 50, 0.05), _region(11, 4, 9, 20, 0.02)]
IDS = [3, 0, 11]
# Same ids, two classes (SMILE or any other 2-class names).
REGIONS2 = [
    _region(3, 1, 0, 120, 0.08, 2),
    _region(0, 0, 1, 50, 0.05, 2),
    _region(11, 1, 0, 20, 0.02, 2),
]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _set_labels(path, labels):
    """Edit the label column like a person would (labels: {region_id: text})."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for row in rows:
        row["label"] = labels.get(int(row["region_id"]), row["label"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write_raw(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ---------------------------------------------------------------------------- parse_label


@pytest.mark.parametrize(
    "text, names, expected",
    [
        ("7", DIGITS, 7),
        (" 7 ", DIGITS, 7),
        ("smiling", SMILE, 1),
        ("Smiling", SMILE, 1),  # case-insensitive, unambiguous
        ("NOT_SMILING", SMILE, 0),
        ("1", SMILE, 1),  # index
        ("+1", SMILE, 1),
        ("skip", SMILE, None),
        ("SKIP", DIGITS, None),
        ("", SMILE, UNLABELED),
        ("   ", DIGITS, UNLABELED),
        ("Cat", ODD, 0),  # exact match wins over the case-insensitive clash
        ("cat", ODD, 1),
        ("5", ODD, 3),  # a name wins over an index
        ("0", ODD, 0),  # not a name: index
        ("dog", ODD, 4),
    ],
)
def test_parse_label_valid(text, names, expected):
    assert parse_label(text, names) == expected


@pytest.mark.parametrize(
    "text, names, match",
    [
        ("frowning", SMILE, "unknown label 'frowning'.*not_smiling, smiling.*skip"),
        ("2", SMILE, "index 2 out of range"),
        ("-1", SMILE, "index -1 out of range"),
        ("10", DIGITS, "out of range"),
        ("CAT", ODD, "ambiguous"),
        ("1.0", DIGITS, "unknown label"),
        ("7 8", DIGITS, "unknown label"),
    ],
)
def test_parse_label_invalid(text, names, match):
    with pytest.raises(ValueError, match=match):
        parse_label(text, names)


def test_only_an_empty_answer_is_unlabeled(tmp_path):
    """A class named like the UNLABELED sentinel is an answer, in the terminal and in the file."""
    names = (UNLABELED, "other")
    assert parse_label(UNLABELED, names) == 0
    assert parse_label(UNLABELED.upper(), names) == 0
    assert parse_label(" ", names) == UNLABELED
    path = write_labels_file(tmp_path / "labels.csv", REGIONS2, names)
    _set_labels(path, {3: UNLABELED, 0: SKIP})  # 11 stays empty
    assert read_labels(path, region_ids=IDS, class_names=names) == {3: 0, 0: None}
    write_auto_labels(path, REGIONS2, names, {3: 0, 0: None}, labeler="t")
    assert read_labels(path, region_ids=IDS, class_names=names) == {3: 0, 0: None}


@pytest.mark.parametrize("names", [(), ("a", "a"), ("a", "")])
def test_parse_label_rejects_bad_class_names(names):
    with pytest.raises(ValueError):
        parse_label("a", names)


# ---------------------------------------------------------------------------- file round trip


def test_template_columns_and_rows(tmp_path):
    path = tmp_path / "label" / "labels.csv"  # parent created
    out = write_labels_file(path, REGIONS, DIGITS, suggestions=label_by_source(REGIONS))
    assert out == str(path)
    with open(path, encoding="utf-8") as f:
        assert f.readline().strip() == ",".join(HEADER)
    rows = _rows(path)
    assert [r["region_id"] for r in rows] == ["3", "0", "11"]  # given order kept
    assert rows[0] == {
        "region_id": "3",
        "label": "",
        "suggested": "2",
        "num_codes": "120",
        "weight": "0.08",
        "top_source": "2",
        "top_pred": "7",
        "grid": "label/region_003.png",
    }
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == {}
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    "names, given, expected",
    [
        (DIGITS, {3: "2", 0: "skip", 11: ""}, {3: 2, 0: None}),
        (DIGITS, {3: "9", 0: "0", 11: "SKIP"}, {3: 9, 0: 0, 11: None}),
        (SMILE, {3: "Smiling", 0: "0", 11: ""}, {3: 1, 0: 0}),
    ],
)
def test_write_read_round_trip(tmp_path, names, given, expected):
    regions = [{"id": r, "num_codes": 5, "weight": 0.1} for r in IDS]
    path = write_labels_file(tmp_path / "labels.csv", regions, names)
    _set_labels(path, given)
    assert read_labels(path, region_ids=IDS, class_names=names) == expected


def test_rewrite_keeps_answers_suggestions_and_extra_columns(tmp_path):
    path = write_labels_file(tmp_path / "labels.csv", REGIONS, DIGITS, suggestions={3: 2})
    _set_labels(path, {3: "two?", 0: "skip"})  # an invalid answer is kept verbatim, not lost
    # A person adds a notes column.
    rows = _rows(path)
    for row in rows:
        row["notes"] = f"n{row['region_id']}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*HEADER, "notes"])
        writer.writeheader()
        writer.writerows(rows)

    # The pipeline reruns and writes the template again (one new region, same others).
    new_regions = REGIONS + [_region(12, 5, 3)]
    write_labels_file(path, new_regions, DIGITS)
    rows = {r["region_id"]: r for r in _rows(path)}
    assert list(rows) == ["3", "0", "11", "12"]
    assert rows["3"]["label"] == "two?" and rows["0"]["label"] == "skip"
    assert rows["11"]["label"] == rows["12"]["label"] == ""
    assert rows["3"]["suggested"] == "2"  # suggestions=None keeps the old ones
    assert rows["3"]["notes"] == "n3" and rows["12"]["notes"] == ""
    with pytest.raises(LabelsFileError, match="line 2: region 3: unknown label 'two\\?'"):
        read_labels(path, region_ids=[3, 0, 11, 12], class_names=DIGITS)

    _set_labels(path, {3: "2"})
    write_labels_file(path, new_regions, DIGITS, suggestions={3: 4})  # new suggestions win
    assert _rows(path)[0]["suggested"] == "4"
    assert read_labels(path, region_ids=[3, 0, 11, 12], class_names=DIGITS) == {3: 2, 0: None}


def test_rewrite_drops_vanished_regions_with_backup(tmp_path):
    path = write_labels_file(tmp_path / "labels.csv", REGIONS, DIGITS)
    _set_labels(path, {3: "2", 0: "6"})
    with pytest.warns(UserWarning, match=r"regions \[0\] dropped.*labels.csv.bak"):
        write_labels_file(path, [REGIONS[0], REGIONS[2]], DIGITS)
    assert read_labels(path, region_ids=[3, 11], class_names=DIGITS) == {3: 2}
    backup = str(path) + ".bak"
    assert read_labels(backup, region_ids=IDS, class_names=DIGITS) == {3: 2, 0: 6}
    # A second drop never overwrites the first backup.
    with pytest.warns(UserWarning, match=r"labels.csv.bak1"):
        write_labels_file(path, [REGIONS[2]], DIGITS)
    assert read_labels(backup, region_ids=IDS, class_names=DIGITS) == {3: 2, 0: 6}
    assert read_labels(backup + "1", region_ids=IDS, class_names=DIGITS) == {3: 2}


def test_rewrite_warns_when_an_answered_region_changed(tmp_path):
    path = write_labels_file(tmp_path / "labels.csv", REGIONS, DIGITS)
    _set_labels(path, {3: "2"})
    changed = [_region(3, 5, 5, 77), *REGIONS[1:]]
    with pytest.warns(UserWarning, match=r"regions \[3\] changed"):
        write_labels_file(path, changed, DIGITS)
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == {3: 2}  # still kept


def test_rewrite_refuses_conflicting_duplicates(tmp_path):
    text = ",".join(HEADER) + "\n3,2,,,,,,\n0,,,,,,,\n3,5,,,,,,\n"
    path = _write_raw(tmp_path / "labels.csv", text)
    with pytest.raises(LabelsFileError, match="line 4: region 3 answered twice"):
        write_labels_file(path, REGIONS, DIGITS)
    with open(path, encoding="utf-8") as f:
        assert f.read() == text  # left untouched


# ---------------------------------------------------------------------------- validation

_H = ",".join(HEADER)


@pytest.mark.parametrize(
    "text, line, match",
    [
        (f"{_H}\n3,2,,,,,,\n0,seven,,,,,,\n", 3, "region 0: unknown label 'seven'"),
        (f"{_H}\n3,10,,,,,,\n", 2, "class index 10 out of range"),
        (f"{_H}\n3,2,,,,,,\n\n42,1,,,,,,\n", 4, "unknown region id 42"),
        (f"{_H}\n3,2,,,,,,\n0,,,,,,,\n3,,,,,,,\n", 4, "duplicate region id 3.*line 2"),
        (f"{_H}\n3,2,,,,,,,,\n", 2, "malformed row: 10 fields"),
        (f"{_H}\nthree,2,,,,,,\n", 2, "malformed row: region_id 'three'"),
        (f"{_H}\n,2,,,,,,\n", 2, "malformed row: region_id ''"),
        ("id,answer\n3,2\n", 1, "malformed header: missing column.*region_id, label"),
        ("region_id,label,label\n3,2,2\n", 1, "duplicate column"),
        ("\n\nregion_id,,label\n3,,2\n", 3, "empty column name"),
        ("", 1, "empty file"),
        (f'{_H}\n3,"2,,,,,,\n', 2, "malformed CSV"),
    ],
)
def test_read_labels_errors_name_file_and_line(tmp_path, text, line, match):
    path = _write_raw(tmp_path / "labels.csv", text)
    with pytest.raises(LabelsFileError, match=match) as info:
        read_labels(path, region_ids=IDS, class_names=DIGITS)
    assert str(info.value).startswith(f"{path}, line {line}: ")
    assert info.value.line == line and info.value.path == path


def test_read_labels_tolerates_bom_short_rows_and_minimal_columns(tmp_path):
    path = _write_raw(tmp_path / "labels.csv", "\ufeffregion_id,label,notes\n3,2\n11, skip ,x\n0\n")
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == {3: 2, 11: None}


# ---------------------------------------------------------------------------- automatic labelers


@pytest.mark.parametrize(
    "counts, expected",
    [([0, 0, 110, 10], 2), ([5, 5, 0, 0], 0), ([0, 3, 3, 3], 1), ([0, 0, 0, 1], 3)],
)
def test_label_by_source_majority_and_ties(counts, expected):
    regions = [{"id": 7, "source_label_counts": counts}, {"id": 2, "source_label_counts": counts}]
    assert label_by_source(regions) == {7: expected, 2: expected}


@pytest.mark.parametrize("counts", [[0, 0, 0], []])
def test_label_by_source_needs_counts(counts):
    with pytest.raises(ValueError, match="region 5 has no source label counts"):
        label_by_source([{"id": 5, "source_label_counts": counts}])


@pytest.mark.parametrize(
    "preds, expected",
    [([2, 2, 1], 2), ([3, 1, 3, 1], 1), ([9], 9), ([0, 4, 4, 0, 7], 0), ([5, 5, 5, 2, 2], 5)],
)
def test_label_by_oracle_majority_and_ties(preds, expected):
    got = label_by_oracle({4: np.asarray(preds, np.int32), 9: np.asarray(preds, np.int64)})
    assert got == {4: expected, 9: expected}


@pytest.mark.parametrize(
    "preds, match",
    [
        (np.zeros((0,), np.int32), "non-empty"),
        (np.zeros((2, 3), np.int32), "non-empty"),
        (np.array([0.2, 0.8]), "class indices"),
        (np.array([1, -1]), "negative"),
    ],
)
def test_label_by_oracle_rejects_bad_predictions(preds, match):
    with pytest.raises(ValueError, match=match):
        label_by_oracle({0: preds})


def test_write_auto_labels_same_artefact(tmp_path):
    path = tmp_path / "labels.csv"
    labels = {3: 2, 0: None}  # region 11 left unanswered
    write_auto_labels(path, REGIONS, DIGITS, labels, labeler="source")
    rows = _rows(path)
    assert list(rows[0]) == [*HEADER, "labeler"]
    assert [(r["label"], r["suggested"], r["labeler"]) for r in rows] == [
        ("2", "2", "source"),
        ("skip", "", "source"),
        ("", "", ""),
    ]
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == labels
    # The template writer keeps auto answers (and the labeler column) on a rerun.
    write_labels_file(path, REGIONS, DIGITS)
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == labels
    assert _rows(path)[0]["labeler"] == "source"


def test_write_auto_labels_backs_up_different_answers(tmp_path):
    path = write_labels_file(tmp_path / "labels.csv", REGIONS2, SMILE)
    _set_labels(path, {3: "smiling"})
    write_auto_labels(path, REGIONS2, SMILE, {3: 1}, labeler="oracle")  # same answer: no backup
    assert not os.path.exists(path + ".bak")
    with pytest.warns(UserWarning, match="previous answers are kept in .*labels.csv.bak"):
        write_auto_labels(path, REGIONS2, SMILE, {3: 0, 0: 1}, labeler="oracle")
    assert read_labels(path + ".bak", region_ids=IDS, class_names=SMILE) == {3: 1}
    assert read_labels(path, region_ids=IDS, class_names=SMILE) == {3: 0, 0: 1}


@pytest.mark.parametrize("labels, match", [({42: 1}, "unknown region 42"), ({3: 2}, "range")])
def test_write_auto_labels_validates(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        write_auto_labels(tmp_path / "l.csv", REGIONS2, SMILE, labels, labeler="x")


def test_class_named_skip_is_written_by_index(tmp_path):
    names = ("skip", "keep")
    path = tmp_path / "labels.csv"
    write_auto_labels(path, REGIONS2, names, {3: 0, 0: None, 11: 1}, labeler="t")
    assert [r["label"] for r in _rows(path)] == ["0", "skip", "keep"]
    assert read_labels(path, region_ids=IDS, class_names=names) == {3: 0, 0: None, 11: 1}


# ---------------------------------------------------------------------------- interactive


class Script:
    """input_fn replacement: returns scripted answers, then raises EOFError (or a given error)."""

    def __init__(self, answers, end=EOFError):
        self.answers = list(answers)
        self.prompts = []
        self.end = end

    def __call__(self, prompt):
        self.prompts.append(prompt)
        if not self.answers:
            raise self.end()
        answer = self.answers.pop(0)
        if isinstance(answer, type) and issubclass(answer, BaseException):
            raise answer()
        return answer


class Printed(list):
    def __call__(self, *args, **kwargs):
        self.append(" ".join(map(str, args)))

    @property
    def text(self):
        return "\n".join(self)


def _session(path, answers, tmp_path, regions=REGIONS, names=DIGITS, end=EOFError):
    script, out = Script(answers, end=end), Printed()
    got = interactive_label(path, regions, names, run_dir=tmp_path, input_fn=script, print_fn=out)
    return got, script, out


def test_interactive_quit_midway_then_resume(tmp_path):
    path = tmp_path / "label" / "labels.csv"
    (tmp_path / "label").mkdir()
    (tmp_path / "label" / "region_003.png").write_bytes(b"png")
    write_labels_file(path, REGIONS, DIGITS, suggestions={3: 2})

    got, script, out = _session(path, ["?", "seven", "", "2", "quit"], tmp_path)
    assert got == {3: 2}
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == {3: 2}
    assert len(script.prompts) == 5 and "region 3" in script.prompts[0]
    text = out.text
    assert "Region 3  (1/3)  120 error codes, weight 0.080" in text
    assert "source labels:    2: 120 (100%)" in text and "predicted labels: 7: 120" in text
    assert str(tmp_path / "label" / "region_003.png") in text  # absolute grid path
    assert "region_000.png  (file missing)" in text
    assert "suggested:        2" in text
    assert "unknown label 'seven'" in text and "no answer given" in text
    assert "    9  9" in text  # help lists the classes
    assert "1/3 regions answered (0 skipped)" in text and "remaining 2" in text

    # Second session asks only for the two remaining regions, in order.
    got, script, out = _session(path, ["skip", "4"], tmp_path)
    assert got == {3: 2, 0: None, 11: 4}
    assert ["region 0" in p for p in script.prompts] == [True, False]
    assert "region 11" in script.prompts[1]
    assert "Labeling 2 of 3 regions (1 already answered)" in out.text
    assert _rows(path)[0]["suggested"] == "2"  # suggestions survive the session's sync

    # Third session has nothing to ask.
    got, script, out = _session(path, [], tmp_path)
    assert got == {3: 2, 0: None, 11: 4} and script.prompts == []
    assert "already answered" in out.text


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_interactive_eof_and_ctrl_c_keep_answers(tmp_path, end):
    path = tmp_path / "labels.csv"  # created by the session
    got, script, out = _session(path, ["6", "SKIP"], tmp_path, end=end)
    assert got == {3: 6, 0: None}
    assert read_labels(path, region_ids=IDS, class_names=DIGITS) == {3: 6, 0: None}
    assert len(script.prompts) == 3
    assert [r["label"] for r in _rows(path)] == ["6", "skip", ""]


def test_interactive_saves_after_every_answer(tmp_path):
    path = tmp_path / "labels.csv"
    seen = []

    def input_fn(prompt):
        # What is on disk when each prompt appears: previous answers already saved.
        seen.append(read_labels(path, region_ids=IDS, class_names=SMILE))
        answers = ["smiling", "0"]
        if len(seen) > len(answers):
            raise KeyboardInterrupt
        return answers[len(seen) - 1]

    got = interactive_label(path, REGIONS2, SMILE, input_fn=input_fn, print_fn=Printed())
    assert seen == [{}, {3: 1}, {3: 1, 0: 0}]
    assert got == {3: 1, 0: 0}
    assert [r["label"] for r in _rows(path)] == ["smiling", "not_smiling", ""]


def test_interactive_back_revises_previous_answer(tmp_path):
    path = tmp_path / "labels.csv"
    got, script, out = _session(path, ["back", "1", "back", "8", "5", "quit"], tmp_path)
    assert "nothing to go back to" in out.text
    assert got == {3: 8, 0: 5}
    assert "current answer:   1" in out.text
    assert [p.split()[3] for p in script.prompts] == ["3", "3", "0", "3", "0", "11"]


def test_interactive_reasks_invalid_answers_in_file(tmp_path):
    path = write_labels_file(tmp_path / "labels.csv", REGIONS, DIGITS)
    _set_labels(path, {3: "2", 0: "sevn"})
    got, script, out = _session(path, ["7", "quit"], tmp_path)
    assert "line 3: region 0: unknown label 'sevn'" in out.text
    assert "region 0" in script.prompts[0]
    assert got == {3: 2, 0: 7}

    # Quitting before reaching a broken answer: returns the valid ones, reports the rest.
    _set_labels(path, {0: "sevn"})
    got, _, out = _session(path, ["quit"], tmp_path)
    assert got == {3: 2} and "unknown label 'sevn'" in out.text


def test_interactive_review_of_auto_labels_records_the_labeler(tmp_path):
    path = tmp_path / "labels.csv"
    write_auto_labels(path, REGIONS, DIGITS, {3: 2, 0: 6}, labeler="source")
    got, script, _ = _session(path, ["9"], tmp_path)  # only region 11 is unanswered
    assert got == {3: 2, 0: 6, 11: 9} and len(script.prompts) == 1
    assert [r["labeler"] for r in _rows(path)] == ["source", "source", "interactive"]


def test_region_grid_titles_say_what_their_samples_show(monkeypatch, tmp_path):
    """A grid's title gives the codes' most common pair and what the classifier says on the
    samples shown, which are drawn near the region's mean and may show something else."""
    vae, clf = _tiny_models()
    _, _, regions, _, _ = _problem()
    regions.records[:] = [
        {"id": i, "num_codes": 7, "top_pair": [0, 2]}
        for i in (0, 1)
    ]  # fmt: skip
    config = SimpleNamespace(distill=SimpleNamespace(seed=0, tau=0.01), grid_samples=6)
    ctx = SimpleNamespace(
        model={"vae": vae, "classifier": clf}.__getitem__, config=config,
        dataset=SimpleNamespace(class_names=("ant", "bee", "cat")),
        dir=SimpleNamespace(rel=lambda p: str(tmp_path / p)),
    )  # fmt: skip
    titles = []
    monkeypatch.setattr(plots, "save_image_grid", lambda *a, **kw: titles.append(kw["suptitle"]))
    label_stage.write_region_grids(ctx, regions)
    key = jax.random.fold_in(jax.random.key(0), 2)
    z = sample_regions(regions, key, 6, tau=0.01)
    for title, zr in zip(titles, z, strict=True):
        shown = np.bincount(evaluation.predict(vae, clf, zr), minlength=3)
        name = ("ant", "bee", "cat")[shown.argmax()]
        assert "7 errors, most often ant -> cat" in title
        assert title.endswith(f"these samples: classifier says {name} ({shown.max()}/6)")
