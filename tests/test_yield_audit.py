"""A person's blind audit of the bug yield (defuse_jax.yield_audit)."""

import numpy as np
import pytest

from defuse_jax import yield_audit as ya

NAMES = ("zero", "one", "two")


def _tagged(values):
    """1x1 images whose pixel is a tag, so that a shuffled sample can be traced back."""
    return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


def _sample(seed=0, n_codes=4, n_known=4):
    codes = _tagged(np.arange(10) / 100)  # tags 0.00 .. 0.09
    known = _tagged(0.5 + np.arange(6) / 100)  # tags 0.50 .. 0.55
    labels = np.array([0, 1, 2, 0, 1, 2])
    known_pred = np.array([1, 1, 2, 2, 1, 2])  # wrong on known images 0 and 3
    return ya.audit_sample(codes, np.arange(10) % 3, (np.arange(10) + 1) % 3, known, labels,
                           known_pred, n_codes=n_codes, n_known=n_known, seed=seed)  # fmt: skip


def test_the_sample_mixes_codes_with_known_images_half_of_them_errors_and_keeps_each_ones_truth():
    sample = _sample()
    tags = np.round(sample.images.reshape(-1) * 100).astype(int)
    assert sample.is_code.sum() == 4 and (~sample.is_code).sum() == 4
    np.testing.assert_array_equal(sample.is_code, tags < 50)
    code_tags, known_tags = tags[sample.is_code], tags[~sample.is_code] - 50
    np.testing.assert_array_equal(sample.truth[sample.is_code], code_tags % 3)
    np.testing.assert_array_equal(sample.pred[sample.is_code], (code_tags + 1) % 3)
    # both errors among the known images, then two it gets right
    assert set(known_tags) >= {0, 3} and len(set(known_tags)) == 4
    np.testing.assert_array_equal(
        sample.truth[~sample.is_code], np.array([0, 1, 2, 0, 1, 2])[known_tags]
    )
    assert not np.all(sample.is_code[:4]), "codes and known images are shuffled together"
    np.testing.assert_array_equal(_sample().images, sample.images)  # seeded
    assert not np.array_equal(_sample(seed=1).images, sample.images)


def test_a_sample_takes_what_there_is():
    sample = _sample(n_codes=50, n_known=50)
    assert sample.is_code.sum() == 10 and (~sample.is_code).sum() == 6


@pytest.mark.parametrize("n_codes, n_known", [(0, 4), (4, -1)])
def test_a_sample_needs_codes(n_codes, n_known):
    with pytest.raises(ValueError, match="n_codes >= 1 and n_known >= 0"):
        _sample(n_codes=n_codes, n_known=n_known)


def test_wilson_interval():
    lo, hi = ya.wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert ya.wilson_interval(0, 10)[0] == 0.0 and ya.wilson_interval(10, 10)[1] == 1.0
    assert ya.wilson_interval(0, 0) is None


S = ya.SKIPPED
# Four codes (source 0, predicted 1) and two known images (class 2, the classifier says 0).
SAMPLE = ya.AuditSample(
    images=np.zeros((6, 1, 1, 1), np.float32),
    is_code=np.array([True, True, True, True, False, False]),
    truth=np.array([0, 0, 0, 0, 2, 2]),
    pred=np.array([1, 1, 1, 1, 0, 2]),
)


@pytest.mark.parametrize(
    "answers, bug, change, skipped, on_known, on_known_errors",
    [
        ([0, 0, 0, 0, 2, 2], 1.0, 0.0, 0.0, 1.0, 1.0),  # every code shows its source
        ([1, 1, 1, 1, 0, 2], 0.0, 1.0, 0.0, 0.5, 0.0),  # every code a class change
        ([0, S, 2, 1, S, 2], 0.25, 0.25, 0.25, 0.5, 0.0),  # a skip is no bug
    ],
)
def test_the_score_reads_the_persons_answers_against_the_key(
    answers, bug, change, skipped, on_known, on_known_errors
):
    score = ya.score_audit(SAMPLE, np.array(answers), {})
    assert score["codes"] == 4
    assert score["bug"]["share"] == bug and score["bug"]["of"] == 4
    assert score["class_change"]["share"] == change
    assert score["skipped"]["share"] == skipped
    assert score["person_on_known"]["share"] == on_known
    assert score["person_on_known_errors"]["share"] == on_known_errors
    lo, hi = score["bug"]["interval"]
    assert lo <= bug <= hi


def test_each_judge_is_scored_against_the_person():
    answers = np.array([0, 0, S, 1, 2, 2])  # bug, bug, unreadable, class change
    judges = {"agrees": np.array([0, 0, 2, 1, 2, 2]), "always 1": np.ones(6, int)}
    score = ya.score_audit(SAMPLE, answers, judges)["judges"]
    assert score["agrees"] == {"bug": 0.5, "agrees_with_person": 1.0, "bug_call_agrees": 1.0,
                               "on_known": 1.0}  # fmt: skip
    assert score["always 1"] == {"bug": 0.0, "agrees_with_person": 1 / 3,
                                 "bug_call_agrees": 0.5, "on_known": 0.0}  # fmt: skip


def test_the_score_needs_every_answer():
    with pytest.raises(ValueError, match="1 images are not answered"):
        ya.score_audit(SAMPLE, np.array([0, 0, 0, 0, 2, ya.UNANSWERED]), {})


def _labels(tmp_path, rows, header="item,label"):
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_answers_are_class_names_indices_skip_or_empty(tmp_path):
    path = _labels(tmp_path, ["1,two", "2, 0 ", "3,skip", "4,", "5,ONE"])
    np.testing.assert_array_equal(ya.read_answers(path, 5, NAMES), [2, 0, S, ya.UNANSWERED, 1])


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["1,zero", "2,four"], "item,label", "line 3: unknown label 'four'"),
        (["1,zero", "1,one"], "item,label", "item '1' is not one of 1..2 or is repeated"),
        (["1,zero", "3,one"], "item,label", "item '3' is not one of 1..2"),
        (["1,zero"], "item,label", r"items \[2\] are missing"),
        (["1,zero", "2,one"], "id,label", "the header must be item,label"),
    ],
)
def test_a_bad_labels_file_names_the_line_and_the_fix(tmp_path, rows, header, message):
    with pytest.raises(ValueError, match=message):
        ya.read_answers(_labels(tmp_path, rows, header), 2, NAMES)


def test_the_files_round_trip_and_the_blank_labels_file_reads_as_unanswered(tmp_path):
    verdicts = {"judge a": np.array([0, 1, 2, 0, 1, 2])}
    sheets = ya.write_audit(str(tmp_path), SAMPLE, verdicts, NAMES)
    assert [s.rsplit("/", 1)[-1] for s in sheets] == ["sheet_1.png"]
    sample, read_verdicts, names = ya.read_audit(str(tmp_path))
    for a, b in zip(sample, SAMPLE, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(read_verdicts["judge a"], verdicts["judge a"])
    assert names == NAMES
    answers = ya.read_answers(str(tmp_path / "labels.csv"), 6, NAMES)
    assert np.all(answers == ya.UNANSWERED)
