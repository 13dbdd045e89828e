"""Labeling stage: one label per misclassification region (METHOD.md step 3).

A region is one kind of model bug, so one answer per region is enough. The answers live in the
labels file (CSV, one row per region). The stage holds four ideas, one module each:

* :mod:`~defuse_jax.labeling.answers`, the answer grammar: what may be written for a region (a
  class name, a class index or ``skip``) and what it means; :func:`parse_label`, :data:`SKIP`,
  :data:`UNLABELED`.
* :mod:`~defuse_jax.labeling.labels_file`, the labels file: its format (:data:`HEADER`), reading
  and validating it (:func:`read_labels`, :func:`listed_regions`, :class:`LabelsFileError`) and
  writing the template a person fills in (:func:`write_labels_file`), merged with the answers
  already given, backed up before any is dropped, written atomically.
* :mod:`~defuse_jax.labeling.automatic`, the automatic labelers for unattended runs and
  benchmarks (:func:`label_by_source`, :func:`label_by_oracle`) and :func:`write_auto_labels`,
  which stores their answers in the same file format.
* :mod:`~defuse_jax.labeling.terminal`, the terminal session (:func:`interactive_label`): a
  person answers the unanswered regions one at a time, saved after every answer, so it can be
  killed and resumed at any time.

Imports go one way: ``answers`` <- ``labels_file`` <- ``automatic``, ``terminal``. This package
re-exports the public API, so ``labeling.read_labels`` and the rest work as before.
"""

from defuse_jax.labeling.answers import SKIP, UNLABELED, parse_label
from defuse_jax.labeling.automatic import label_by_oracle, label_by_source, write_auto_labels
from defuse_jax.labeling.labels_file import (
    HEADER,
    LabelsFileError,
    listed_regions,
    read_labels,
    write_labels_file,
)
from defuse_jax.labeling.terminal import interactive_label

__all__ = [
    "HEADER",
    "SKIP",
    "UNLABELED",
    "LabelsFileError",
    "interactive_label",
    "label_by_oracle",
    "label_by_source",
    "listed_regions",
    "parse_label",
    "read_labels",
    "write_auto_labels",
    "write_labels_file",
]
