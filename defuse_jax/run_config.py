"""`RunConfig`: everything a Defuse run depends on, its JSON form, and per-stage fingerprints."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal

from defuse_jax import correction
from defuse_jax import train_models as tm
from defuse_jax import training_lengths as tl
from defuse_jax.config_checks import (
    NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE_INT,
    OPTIONAL_SHIFTS,
    POSITIVE_INT,
    check_fields,
    fingerprint_fields,
)
from defuse_jax.correction import CorrectConfig
from defuse_jax.data import DataConfig
from defuse_jax.evaluation import EvalConfig
from defuse_jax.files import json_digest, sha256
from defuse_jax.models import ClassifierConfig, VAEConfig
from defuse_jax.own_model import OwnModel
from defuse_jax.regions import DistillConfig
from defuse_jax.run_dir import RunDir
from defuse_jax.search import SearchConfig
from defuse_jax.search.scale_sweep import check_sweep
from defuse_jax.training import TrainConfig

STAGES = ("train", "search", "distill", "label", "correct", "evaluate")
# The run's search keeps only samples the oracle still reads as their source class (validity
# "oracle"): the paper's search ("none") keeps mostly class changes, 9-18% bugs by an
# evaluation-only judge on digits and Fashion-MNIST against 40-68% with the constraint
# (docs/results.md, "Bug yield"). Its samples per source are sized from the number of sources
# (`search.sizing.samples_per_source`): the constraint keeps few of them.
DEFAULT_SEARCH = SearchConfig(mode="sample", num_samples=None, scale=0.5, max_keep_per_source=10,
                              validity="oracle")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a Defuse run depends on (each stage's fingerprint covers its part).

    Attributes:
        data: the dataset.
        vae: VAE architecture (None: chosen from the image shape).
        vae_train: VAE optimisation.
        classifier: classifier architecture (None: chosen from the image shape).
        classifier_train: classifier optimisation.
        own_classifier: debug the user's own classifier, named by its entry point
            (`own_model.OwnModel`, the command line's --classifier-fn and --classifier-ckpt),
            instead of training the project's (then `classifier` and `classifier_train` are
            unused). From Python, `pipeline.run(..., classifier=...)` takes the model itself.
        own_vae: search with the user's own generative model (--vae-fn, --vae-ckpt) instead of
            training the project's VAE (`vae` and `vae_train` unused; `pipeline.run(...,
            vae=...)` from Python).
        max_sources: search from at most this many test points (None: all of them).
        search: the latent search.
        search_scales: candidate perturbation scales: the search stage runs a pilot of the
            search at each (one program, on up to 256 sources) and searches at the smallest
            that keeps at least one error code per searched source (the largest if none does;
            `search.scale_choice`). Made for a conditional VAE, whose scale depends on the data
            (2 on 8x8 digits, 0.5 on Fashion-MNIST). None: 0.5, 1, 2 and 4 behind a
            conditional VAE (`identification.CONDITIONAL_SCALES`), else `search.scale`.
        distill: the mixture and region cutoffs.
        labeler: "source" (majority source label), "oracle" (a stronger, separately trained
            classifier) or "manual" (a person fills in label/labels.csv or runs
            `defuse-jax label`).
        grid_samples: decoded samples per region shown in its grid.
        oracle_check: check every region's label with the oracle classifier (a stronger,
            separately trained one, `stages.label.train_oracle`, kept in label/oracle/ and
            trained in the label stage whatever the labeler): the labels file and the terminal
            labeler flag regions whose suggested label (the oracle labeler: its own vote) it
            disputes on most fresh samples as ambiguous, and the report gives its agreement
            with every label (`label_validity`).
            Costs one more classifier training: on digits on a 2-core CPU the label stage takes
            7 s instead of 1 s (3.5 s of them training steps; the train stage takes 6 s), cheap
            enough to be on by default. The oracle labeler trains the oracle and checks with it
            either way.
        oracle_members: how many classifiers the oracle averages (`models.Ensemble`, member k
            trained with seed + k). None (the default): 3, or 1 when the oracle is a stronger
            kind than the classifier (a conv oracle for an MLP classifier, 28x28 data). One
            model of the classifier's own kind is barely more accurate than the classifier (on
            Fashion-MNIST 10k, conv: 87.0% against 85.2%); three reach 88.5%.
        oracle_shift: the oracle's members train on their images shifted by up to this many
            pixels on each axis, drawn anew every step (`TrainConfig.shift`). Several values
            (`--oracle-shift 0 1`) train `oracle_members` classifiers at each: the labels and
            checks read their mean, the search's validity constraint asks each shift's group
            to read the source class. None (the default): `train_models.oracle_shifts` of the
            image size, a committee: 0 and 2 on 28x28 images, 0 and 1 on 8x8 ones. Trained
            without shifts, a conv oracle shares the blind spots of the conv classifier it
            checks: on 28x28 digits it reads 0-30% of that classifier's test errors as their
            class, where a conv trained with shifts reads 67-100%; the unshifted group errs on
            other images than the shifted one, so asking both keeps fewer class changes.
        correct: fine-tuning.
        eval: evaluation.
        progress: progress bars (display only: in no stage's fingerprint).
    """

    data: DataConfig = DataConfig()
    vae: VAEConfig | None = None
    vae_train: TrainConfig = tm.VAE_TRAIN_DEFAULT
    classifier: ClassifierConfig | None = None
    classifier_train: TrainConfig = tm.CLASSIFIER_TRAIN_DEFAULT
    own_classifier: OwnModel | None = None
    own_vae: OwnModel | None = None
    max_sources: int | None = None
    search: SearchConfig = DEFAULT_SEARCH
    search_scales: tuple[float, ...] | None = None
    distill: DistillConfig = DistillConfig()
    labeler: Literal["source", "oracle", "manual"] = "oracle"
    grid_samples: int = 16
    oracle_check: bool = True
    oracle_members: int | None = None
    oracle_shift: tuple[int, ...] | None = None
    correct: CorrectConfig = CorrectConfig()
    eval: EvalConfig = EvalConfig()
    progress: bool = True

    @property
    def uses_oracle(self) -> bool:
        """Whether the run trains the oracle classifier (the search's validity model, the
        labeler or the label check)."""
        return self.oracle_check or self.labeler == "oracle" or self.search.validity == "oracle"

    def __post_init__(self):
        if self.labeler not in ("source", "oracle", "manual"):
            raise ValueError(
                f"Unknown labeler {self.labeler!r}; use 'source', 'oracle' or 'manual'."
            )
        if self.correct.select and self.data.val_fraction == 0:
            raise ValueError(
                "The correction chooses lambda and its epoch on a validation split "
                "(correct.select), but data.val_fraction is 0. Set --val-fraction > 0, or "
                "pass --no-correct-select to keep the last epoch of lambda = correct.lam."
            )
        if NON_NEGATIVE_INT.ok(self.oracle_shift):  # one shift, as run directories hold it
            object.__setattr__(self, "oracle_shift", (self.oracle_shift,))
        elif isinstance(self.oracle_shift, list):
            object.__setattr__(self, "oracle_shift", tuple(self.oracle_shift))
        check_fields(self, {"grid_samples": POSITIVE_INT, "max_sources": OPTIONAL_POSITIVE_INT,
                            "oracle_members": OPTIONAL_POSITIVE_INT,
                            "oracle_shift": OPTIONAL_SHIFTS})  # fmt: skip
        if self.search_scales is not None:
            try:
                check_sweep(self.search, self.search_scales)
            except ValueError as e:
                raise ValueError(f"search_scales (--search-scales): {e}") from None


def stage_fingerprints(
    config: RunConfig, run_dir: str, *, own: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, str]:
    """Fingerprint of every stage: its own settings plus the fingerprint of the stage before.

    Args:
        config: the run's configuration.
        run_dir: the run directory (the correction's covers its labels file).
        own: the identities of the user's own models ({"classifier"/"vae":
            `own_model.describe`}: the digest of the weights and the name), which take the
            place of the settings of the project's model they replace; other weights redo
            every stage.
    """
    own = own or {}
    train: dict[str, Any] = {"data": dataclasses.asdict(config.data)}
    project = {
        "vae": (config.vae, config.vae_train),
        "classifier": (config.classifier, config.classifier_train),
    }
    for name, (model, settings) in project.items():
        if name in own:  # an entry point's name is in its identity, its checkpoint's path not
            train[f"own_{name}"] = dict(own[name])
        else:
            train[name] = model and fingerprint_fields(model)
            train[f"{name}_train"] = fingerprint_fields(settings)
    parts: dict[str, Any] = {
        "train": train,
        "search": {"search": fingerprint_fields(config.search), "max_sources": config.max_sources,
                   **_given(search_scales=list(config.search_scales) if config.search_scales
                            else None),
                   # a validity search trains the oracle
                   **(_given(oracle_members=config.oracle_members,
                             oracle_shift=_shift_record(config.oracle_shift))
                      if config.search.validity != "none" else {})},
        "distill": dataclasses.asdict(config.distill),
        # (oracle_members came later: left out at None, so earlier runs keep their labels)
        "label": {"labeler": config.labeler, "grid_samples": config.grid_samples,
                  "oracle_check": config.oracle_check, **_given(
                      oracle_members=config.oracle_members,
                      oracle_shift=_shift_record(config.oracle_shift))},
        # Hand edits of the labels file redo the correction.
        "correct": {"correct": fingerprint_fields(config.correct), "labels": _file_hash(
            RunDir(run_dir).labels)},
        "evaluate": dataclasses.asdict(config.eval),
    }  # fmt: skip
    out, prev = {}, ""
    for stage in STAGES:
        prev = json_digest({"upstream": prev, "stage": stage, "config": parts[stage]})
        out[stage] = prev
    return out


def resolved_lengths(config: RunConfig, n_train: int) -> RunConfig:
    """`config` with every unset training length derived from the training split's size
    `n_train` (the rules of `training_lengths`), and the correction's region weights from the
    search (`CorrectConfig.lams`)."""
    narrow = config.search.validity != "none" or config.distill.per_label
    return dataclasses.replace(
        config,
        vae_train=tl.train_epochs(config.vae_train, tl.VAE_BUDGET, n_train),
        classifier_train=tl.train_epochs(config.classifier_train, tl.CLASSIFIER_BUDGET, n_train),
        correct=correction.resolved(config.correct, n_train, narrow_regions=narrow),
    )


def lengths_of(config: RunConfig, n_train: int) -> dict[str, Any]:
    """What a resolved `config` trains for, as recorded in config.json."""
    return {
        "num_train": n_train,
        "vae_epochs": config.vae_train.epochs,
        "classifier_epochs": config.classifier_train.epochs,
        "oracle_epochs": tl.oracle_epochs(config.classifier_train),
        "correction_rounds": config.correct.epochs,
        "correction_round_steps": config.correct.epoch_steps,
        "correction_lams": list(config.correct.lams),
        "churn_images": min(n_train, tl.CHURN_IMAGES),
    }


def _shift_record(shift: tuple[int, ...] | None) -> int | list[int] | None:
    """`RunConfig.oracle_shift` as fingerprints record it: one shift as the number it was
    before several could be given, so that those runs keep their fingerprints."""
    if shift is None:
        return None
    return shift[0] if len(shift) == 1 else list(shift)


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _file_hash(path: str) -> str | None:
    return sha256(path)[:16] if os.path.exists(path) else None


def quick(config: RunConfig) -> RunConfig:
    """A downsized copy of `config` for smoke tests and notebooks (about a minute on a CPU)."""
    small_train = dict(epochs=6, batch_size=32, learning_rate=2e-3)
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, max_train=600, max_test=200),
        vae_train=dataclasses.replace(config.vae_train, **{**small_train, "epochs": 15}),
        classifier_train=dataclasses.replace(config.classifier_train, **small_train),
        # Every one of the 200 test points a source and 16 components: the validity committee
        # of 8x8 images keeps few codes, and with 80 sources and 8 components the run formed
        # 0-1 error regions to label, by platform; this forms 2-5.
        max_sources=None,
        search=dataclasses.replace(config.search, num_samples=64),
        distill=dataclasses.replace(
            config.distill, n_components=16, max_iter=100, min_codes=5, error_samples=32
        ),
        grid_samples=8,
        oracle_members=1,
        correct=dataclasses.replace(
            config.correct, epochs=2, batch_size=32, lams=(0.01,), select_samples=64
        ),
    )


def _build(cls: type, value: Any) -> Any:
    """Rebuild a (possibly optional) dataclass field from its JSON form."""
    if value is None or not dataclasses.is_dataclass(cls):
        return value
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in value:
            continue  # a field added since the file was written keeps its default
        v = value[f.name]
        tp = hints[f.name]
        sub = _dataclass_in(tp)
        if sub is not None:
            v = _build(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def _dataclass_in(tp: Any) -> type | None:
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of `dataclasses.asdict(RunConfig)` (e.g. a run directory's config.json)."""
    return _build(RunConfig, d)


def load_run_config(run_dir: str) -> RunConfig | None:
    """The configuration a run directory was last run with, or None for a new directory."""
    path = RunDir(run_dir).config
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return config_from_dict(json.load(f))
