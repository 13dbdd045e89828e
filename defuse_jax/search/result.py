"""`SearchResult`, built from the candidates the device compacted (`engine.fetch_found`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from defuse_jax.search.config import SearchConfig


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Adversarial examples found by `latent_search`, ordered by source then perturbation norm.

    Attributes:
      z: [M, L] float32 latent codes of the M examples found (and kept).
      source_index: [M] int32 index of the source point in `z0`.
      source_label: [M] int32 the source's true label `y0[source_index]`.
      pred_label: [M] int32 the classifier's prediction on `decode(z)` (!= source_label).
      prob: [M] float32 the classifier's softmax probability of `pred_label`.
      perturbation_norm: [M] float32 ||z - z0[source_index]||_2.
      flips_per_source: [N] int32 flips found per source before `max_keep_per_source`.
      used: [N] bool sources searched (not skipped as misclassified at z0).
      num_samples_evaluated: latent codes evaluated on used sources.
      num_sources_used: sources searched.
      num_sources_skipped: sources skipped because the classifier got them wrong at z0.
      wall_time_s: wall time of the call (including compilation on a first call).
      config: the configuration used.
    """

    z: np.ndarray
    source_index: np.ndarray
    source_label: np.ndarray
    pred_label: np.ndarray
    prob: np.ndarray
    perturbation_norm: np.ndarray
    flips_per_source: np.ndarray
    used: np.ndarray
    num_samples_evaluated: int
    num_sources_used: int
    num_sources_skipped: int
    wall_time_s: float
    config: SearchConfig

    @property
    def num_found(self) -> int:
        """Adversarial examples kept (M)."""
        return int(self.source_index.shape[0])

    @property
    def num_flips(self) -> int:
        """Flips found in total, before keeping `max_keep_per_source` per source."""
        return int(self.flips_per_source.sum())

    def __len__(self) -> int:
        return self.num_found

    def summary(self) -> str:
        """One line: what was searched and what was found."""
        if self.num_found == 0:
            found = "no adversarial examples found"
        else:
            found = (
                f"{self.num_found} adversarial examples kept ({self.num_flips} flips) from "
                f"{np.unique(self.source_index).size} sources"
            )
        return (
            f"{self.config.mode} search: {self.num_samples_evaluated} samples on "
            f"{self.num_sources_used} sources ({self.num_sources_skipped} skipped as "
            f"misclassified) in {self.wall_time_s:.3f}s; {found}."
        )


def compact(found, num_sources: int, *, config: SearchConfig, wall_time_s: float) -> SearchResult:
    """The `SearchResult` of one replica's candidates, already compacted on the device.

    Args:
      found: `engine.HostFound`: the found candidates in (source, norm) order and the padded
        sources' flips and searched flags.
      num_sources: N, the real (unpadded) number of sources.
      config: the configuration used.
      wall_time_s: the call's wall time.

    Returns:
      The `SearchResult`.
    """
    used = found.used[:num_sources]
    n_used = int(used.sum())
    return SearchResult(
        z=found.z,
        source_index=found.source,
        source_label=found.label,
        pred_label=found.pred,
        prob=found.prob,
        perturbation_norm=found.norm,
        flips_per_source=found.flips[:num_sources],
        used=used,
        num_samples_evaluated=n_used * config.samples_per_source,
        num_sources_used=n_used,
        num_sources_skipped=num_sources - n_used,
        wall_time_s=float(wall_time_s),
        config=config,
    )
