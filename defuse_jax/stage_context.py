"""`Context`: what the stages of one `pipeline.run` call share (run directory, configuration,
log, the dataset and models loaded once), and `LabelsPending`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from defuse_jax import train_models as tm
from defuse_jax.data import Dataset, load_dataset
from defuse_jax.models import Params
from defuse_jax.run_config import RunConfig
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
            self._models[name] = tm.load_trained(self.path(*where))[0]
        return self._models[name]
