"""`SearchConfig`: every knob of the latent search, validated, hashable (one jit per config)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

Mode = Literal["sample", "iterative", "gradient"]
Distribution = Literal["gaussian", "laplace", "uniform_ball", "beta_offset"]
ComputeDtype = Literal["float32", "bfloat16"]
Optimizer = Literal["adam", "sgd"]
Validity = Literal["none", "oracle"]
# The Literals are the one source of the choices (`--help` lists them; __post_init__ checks).
MODES = typing.get_args(Mode)
DISTRIBUTIONS = typing.get_args(Distribution)
DTYPES = typing.get_args(ComputeDtype)
OPTIMIZERS = typing.get_args(Optimizer)
VALIDITIES = typing.get_args(Validity)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Configuration of `latent_search`.

    Work is organised in *chains*: every source point gets `chains_per_source` chains and every
    chain runs `rounds_per_chain` rounds, evaluating one latent code per round. In `"sample"` mode
    a chain is a single i.i.d. perturbation (one round), so `num_samples` (Q in the paper) chains
    per source; in `"iterative"` and `"gradient"` mode `chains_per_source` chains run
    `num_rounds` rounds each.

    Attributes:
      mode: `"sample"` (the paper: Q i.i.d. perturbations per source), `"iterative"` (Zhao et al.
        radius window that widens until a flip and then shrinks toward the source), or
        `"gradient"` (optax descent on the source-label margin plus a distance penalty).
      num_samples: Q, perturbations per source in `"sample"` mode; None spreads a budget of
        samples over the sources (`sizing.samples_per_source`: 500,000 in all, 100 to 1,000
        per source), resolved by `latent_search` once it knows how many sources there are.
      chains_per_source: chains per source in `"iterative"` / `"gradient"` mode.
      num_rounds: rounds (radius updates or optimiser steps) per chain in those modes.
      distribution: perturbation law in `"sample"` mode: `"gaussian"` (N(0, scale^2) per
        dimension), `"laplace"` (Laplace(0, scale) per dimension), `"uniform_ball"` (uniform
        direction, radius uniform in [radius_min, radius_max]) or `"beta_offset"` (Beta(beta_a,
        beta_a) per dimension, *not* centred: the reference demo's law, for parity runs).
      scale: scale of the gaussian / laplace laws; also the initial jitter of gradient chains.
      radius_min: inner radius of `"uniform_ball"`.
      radius_max: outer radius of `"uniform_ball"`.
      beta_a: the Beta(a, a) parameter of `"beta_offset"` (reference: 50; 75 for SVHN).
      radius_step: `"iterative"`: width of the first radius window and of each widening step.
      learning_rate: `"gradient"`: optimiser step size.
      optimizer: `"gradient"`: `"adam"` or `"sgd"`.
      distance_penalty: `"gradient"`: weight of ||z - z0||^2 in the loss.
      margin_floor: `"gradient"`: the margin loss is clipped at -margin_floor, so once a chain has
        crossed the boundary by that much only the distance penalty pulls (chains then walk
        along the boundary, close to the source, recording many small flips).
      max_keep_per_source: keep the k smallest-norm adversarial examples per source (reference:
        3-5); `None` keeps every one found.
      skip_misclassified: skip sources the classifier already gets wrong at z0.
      chunk_size: chains evaluated together per device step; bounds memory (decoded images exist
        only for one chunk) and sets the cache working set. Results do not depend on it. None
        (the default) picks it from the backend, the model's FLOPs per sample and the device's
        memory (`search.sizing`: ~2,048 for the digits MLPs and ~128 for the 28x28 conv models
        on a CPU; 262,144 and 32,768 on an H200); `defuse-jax bench search` measures the best.
      compute_dtype: `"float32"` or `"bfloat16"`: z is cast to it before `decode_fn`, and the
        logits are read back in float32. The caller owns the weights' dtype: layers compute in
        the promoted dtype of input and weights, so float32 weights keep a "bfloat16" search in
        float32 (the search warns). Bind the models with
        `models.search_functions(vae, classifier, compute_dtype=...)` (or cast them with
        `models.cast_params`) so the whole forward pass runs in bfloat16.
      validity: what must still read the source label for a changed prediction to count as
        an error. `"none"` (the paper: every changed prediction counts, most of them class
        changes) or `"oracle"` (the run's oracle classifier, trained before the search, must
        still read the source class on the decoded image; Song et al. 2018's auxiliary
        classifier). The library's `latent_search` takes the auxiliary model as `validity_fn`.
      seed: the search's random key: the pipeline searches with `jax.random.key(seed)`, and
        `latent_search` uses it when called with `key=None`.
    """

    mode: Mode = "sample"
    num_samples: int | None = 100
    chains_per_source: int = 8
    num_rounds: int = 16
    distribution: Distribution = "gaussian"
    scale: float = 0.5
    radius_min: float = 0.0
    radius_max: float = 2.0
    beta_a: float = 50.0
    radius_step: float = 0.25
    learning_rate: float = 0.05
    optimizer: Optimizer = "adam"
    distance_penalty: float = 0.1
    margin_floor: float = 0.0
    max_keep_per_source: int | None = 5
    skip_misclassified: bool = True
    chunk_size: int | None = None
    compute_dtype: ComputeDtype = "float32"
    validity: Validity = "none"
    seed: int = 0

    # Fingerprints leave a field out at this value (`config_checks.fingerprint_fields`), so that
    # runs made before it existed are not redone.
    LATER_DEFAULTS: typing.ClassVar[dict[str, str]] = {"validity": "none"}

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"SearchConfig: {msg}")

        if self.mode not in MODES:
            fail(f"mode={self.mode!r}; choose one of {MODES}.")
        if self.distribution not in DISTRIBUTIONS:
            fail(f"distribution={self.distribution!r}; choose one of {DISTRIBUTIONS}.")
        if self.compute_dtype not in DTYPES:
            fail(f"compute_dtype={self.compute_dtype!r}; choose one of {DTYPES}.")
        if self.optimizer not in OPTIMIZERS:
            fail(f"optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}.")
        if self.validity not in VALIDITIES:
            fail(f"validity={self.validity!r}; choose one of {VALIDITIES}.")
        sized = {"chunk_size": "; or None to pick it by backend.",
                 "num_samples": "; or None to size it from the number of sources."}  # fmt: skip
        for name in ("num_samples", "chains_per_source", "num_rounds", "chunk_size"):
            value = getattr(self, name)
            if name in sized and value is None:
                continue
            if not isinstance(value, int) or value < 1:
                fail(
                    f"{name}={value!r}; it must be a positive int (zero samples search nothing)"
                    + sized.get(name, ".")
                )
        k = self.max_keep_per_source
        if k is not None and (not isinstance(k, int) or k < 1):
            fail(f"max_keep_per_source={k!r}; use a positive int, or None to keep all.")
        for name in ("scale", "beta_a", "radius_step", "learning_rate", "radius_max"):
            if not float(getattr(self, name)) > 0.0:
                fail(f"{name}={getattr(self, name)!r}; it must be > 0.")
        if not 0.0 <= self.radius_min < self.radius_max:
            fail(f"need 0 <= radius_min < radius_max, got {self.radius_min}, {self.radius_max}.")
        if self.distance_penalty < 0.0 or self.margin_floor < 0.0:
            fail("distance_penalty and margin_floor must be >= 0.")

    @property
    def chains(self) -> int:
        """Chains per source point."""
        if self.mode != "sample":
            return self.chains_per_source
        if self.num_samples is None:
            raise ValueError(
                "SearchConfig(num_samples=None) is sized from the number of sources: resolve it "
                "with search.sizing.with_samples(config, num_sources) (latent_search does)."
            )
        return self.num_samples

    @property
    def rounds(self) -> int:
        """Rounds (evaluated latent codes) per chain."""
        return 1 if self.mode == "sample" else self.num_rounds

    @property
    def samples_per_source(self) -> int:
        """Latent codes evaluated per source point."""
        return self.chains * self.rounds

    @property
    def keep(self) -> int:
        """Candidates kept per source on device (k of the top-k)."""
        k = self.max_keep_per_source
        return self.samples_per_source if k is None else min(k, self.samples_per_source)


def source_readers(validity: str) -> str:
    """Who must read a source right at its code for the search to start from it, in words: the
    classifier, and with a validity constraint its model too (the run's oracle)."""
    return "the classifier" + (
        "" if validity == "none" else f" or the {validity} (the validity model)"
    )
