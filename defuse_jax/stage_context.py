"""`Context`: what the stages of one `pipeline.run` call share (run directory, configuration,
log, the dataset and models loaded once), `of_run`, the same for a run directory's tools
(audit, sweep, scripts), and `LabelsPending`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

from defuse_jax import own_model
from defuse_jax import train_models as tm
from defuse_jax.data import Dataset, dataset_sha256, load_dataset
from defuse_jax.models import Params
from defuse_jax.run_config import RunConfig, load_run_config, stage_fingerprints
from defuse_jax.run_dir import RunDir


class LabelsPending(RuntimeError):
    """The manual labeler is waiting for a person to fill in the labels file."""


@dataclasses.dataclass
class Context:
    """What the stages share inside one `run` call (loaded lazily, once)."""

    run_dir: str
    config: RunConfig
    log: Callable[[str], None]
    messages: list[str] = dataclasses.field(default_factory=list)
    _dataset: Dataset | None = None
    _models: dict[str, Params] = dataclasses.field(default_factory=dict)
    # The user's own models ("classifier", "vae"; `own_model`), used instead of training the
    # project's.
    own_models: dict[str, Params] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Their identities (`own_model.describe`), in every stage's fingerprint.
        self.own = {name: own_model.describe(m) for name, m in self.own_models.items()}
        self._models.update(self.own_models)

    @property
    def own_classifier(self) -> Params | None:
        return self.own_models.get("classifier")

    def fingerprints(self) -> dict[str, str]:
        """Every stage's fingerprint (`run_config.stage_fingerprints`), the user's models'
        identities included."""
        return stage_fingerprints(self.config, self.run_dir, own=self.own)

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)

    def path(self, *parts: str) -> str:
        return self.dir.path(*parts)

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.config.data)
        return self._dataset

    @functools.cached_property
    def dataset_sha256(self) -> str:
        """`data.dataset_sha256` of the dataset, once per `run` call: the oracle's identity is
        checked by the search and again when an outdated label stage is set aside."""
        return dataset_sha256(self.dataset)

    def model(self, name: str) -> Params:
        """ "vae", "classifier" (original), "corrected", "control" (fine-tuned without
        regions, `CorrectConfig.control`) or "oracle"."""
        if name not in self._models:
            where = {
                "vae": ("train", "vae"),
                "classifier": ("train", "classifier"),
                "corrected": ("correct", "classifier"),
                "control": ("correct", "classifier", "control"),
                "oracle": ("label", "oracle"),
            }[name]
            if self.own_classifier is not None and name in ("corrected", "control"):
                # the user's model: its fine-tuned weights restored into its own structure
                self._models[name] = tm.restore_weights(self.path(*where), self.own_classifier)
            elif name == "oracle":  # one classifier, or an ensemble (`stages.label`)
                self._models[name] = tm.load_ensemble(self.path(*where))
            else:
                self._models[name] = tm.load_trained(self.path(*where))[0]
        return self._models[name]


def of_run(run_dir: str, *, log: Callable[[str], None] = print) -> Context:
    """A run directory's `Context` for the tools that read a run (`defuse-jax audit`, `sweep`,
    scripts/): its saved configuration, its dataset and its models as its stages load them,
    the user's own models by the entry points the configuration names.

    Raises:
      FileNotFoundError: `run_dir` holds no run (no config.json).
    """
    config = load_run_config(run_dir)
    if config is None:
        raise FileNotFoundError(
            f"{run_dir} holds no run (no config.json); run `defuse-jax run --out {run_dir}`."
        )
    return Context(os.path.abspath(run_dir), config, log,
                   own_models=own_model.own_models(config))  # fmt: skip
