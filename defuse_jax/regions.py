"""Distillation: misclassification regions from the latent codes of the errors the search found.

A mixture model is fitted on the error codes; every kept component is one *region*, one kind of
model bug. A region is stored as its mean and covariance in latent space; fresh inputs from it
are decoded from z ~ N(mean, tau * covariance).

Example:
    >>> regions = distill(codes, source_label, pred_label, num_classes=10,
    ...                   config=DistillConfig(), predict_fn=predict)
    >>> z = sample_regions(regions, jax.random.key(0), 64, tau=0.01)  # [R, 64, L]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.exceptions import ConvergenceWarning

from defuse_jax.config_checks import (
    NON_NEGATIVE,
    OPTIONAL_POSITIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
)
from defuse_jax.files import atomic_write, write_npz
from defuse_jax.mixture import BayesianGaussianMixture, GaussianMixture, IllDefinedCovarianceError
from defuse_jax.precision import exact


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How error codes become regions.

    Attributes:
        method: "dpgmm" (Dirichlet-process variational mixture, the reference) or "gmm" (EM).
        n_components: mixture components (an upper bound for "dpgmm"; the reference uses 100).
        max_iter: the most mixture iterations; a fit stops earlier once it converges. The
            reference's 10,000 lets every fit converge: the 13 digits runs of the README's seed
            tables converged in 61-676 iterations (two of them needed more than 500).
        weight_cutoff: keep components whose weight exceeds this (the reference uses 0.01).
        min_codes: keep regions that hold at least this many error codes.
        per_label: fit one mixture per predicted label instead of one on all codes, each with
            up to `n_components` (give it a few: 100 spread a label's codes too thin for any
            to pass `weight_cutoff`). Its regions are purer: on Fashion-MNIST 10k (MLP models),
            3 per label gave a median purity of 63% and 60% against 42% and 44%, fixed to 98.8%
            and 99.9% by the stronger region weights it implies (`correction.STRONG_LAMS`).
        max_codes: fit on at most this many codes (a seeded subsample); every code is still
            assigned to a region afterwards. None (the default) picks by backend
            (`default_max_codes`): the reference's 10,000 on a CPU, where the fit's time grows
            with it, and 200,000 on an accelerator, which fits that many in seconds.
        tau: regions are sampled from N(mean, tau * covariance) (the reference uses 0.01).
        error_samples: fresh samples per region for its error-rate estimate.
        min_error_rate: a region whose sampled error rate is below this is "not an error
            region": listed separately in the report, not offered for labeling and left out of
            region accuracy (in [0, 1]; 0 keeps every region).
        seed: seed of the subsample, the mixture initialisation and the region samples.
    """

    method: Literal["dpgmm", "gmm"] = "dpgmm"
    n_components: int = 100
    max_iter: int = 10_000
    weight_cutoff: float = 0.01
    min_codes: int = 10
    per_label: bool = False
    max_codes: int | None = None
    tau: float = 0.01
    error_samples: int = 256
    min_error_rate: float = 0.5
    seed: int = 0

    def __post_init__(self):
        check_fields(self, {
            "n_components": POSITIVE_INT, "max_iter": POSITIVE_INT, "weight_cutoff": NON_NEGATIVE,
            "min_codes": POSITIVE_INT, "max_codes": OPTIONAL_POSITIVE_INT, "tau": POSITIVE,
            "error_samples": POSITIVE_INT,
        })  # fmt: skip
        if not 0.0 <= float(self.min_error_rate) <= 1.0:
            raise ValueError(
                f"DistillConfig: min_error_rate={self.min_error_rate!r}; it is a share of "
                "region samples the classifier gets wrong, so it must lie in [0, 1]."
            )


@dataclasses.dataclass(frozen=True)
class Regions:
    """The kept regions, sorted by how many errors they explain (largest first).

    Attributes:
        means: [R, L] region means in latent space.
        covariances: [R, L, L] region covariances.
        weights: [R] mixture weights (of the whole error set).
        assignment: [M] region index of every error code, -1 for codes in dropped components.
        records: per-region summaries (JSON-able dicts; see `distill`).
        fits: one JSON-able dict per mixture fit (one, or one per predicted label with
            `per_label`): `label` (None: all codes), `codes` fitted, `converged`, `n_iter`,
            `max_iter`. Empty for regions saved before it was kept.
    """

    means: np.ndarray
    covariances: np.ndarray
    weights: np.ndarray
    assignment: np.ndarray
    records: list[dict[str, Any]]
    fits: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def converged(self) -> bool:
        """Whether every mixture fit converged within `max_iter` (True when there was none)."""
        return all(f["converged"] for f in self.fits)

    @property
    def num_regions(self) -> int:
        return len(self.records)


CPU_MAX_CODES = 10_000
ACCELERATOR_MAX_CODES = 200_000


def default_max_codes(backend: str | None = None) -> int:
    """`DistillConfig.max_codes=None` on `backend` (default: JAX's default backend)."""
    backend = jax.default_backend() if backend is None else backend
    return CPU_MAX_CODES if backend == "cpu" else ACCELERATOR_MAX_CODES


def resolved_max_codes(config: DistillConfig) -> int:
    """The cap on the codes a mixture is fitted on: `config.max_codes`, or the backend's
    default (`default_max_codes`) when it is None."""
    return default_max_codes() if config.max_codes is None else config.max_codes


def _groups(
    source_label: np.ndarray, pred_label: np.ndarray, *, per_label: bool, by_source: bool
) -> list[tuple[int | None, int | None, np.ndarray]]:
    """The sets of codes `distill` fits one mixture each on: [(source class or None, predicted
    class or None, indices)]; all codes, or per source class (`by_source`) and/or per
    predicted class (`per_label`)."""
    keys = np.stack(
        [source_label if by_source else np.zeros_like(pred_label),
         pred_label if per_label else np.zeros_like(pred_label)], axis=1,
    )  # fmt: skip
    out = []
    for src, prd in np.unique(keys, axis=0) if len(keys) else []:
        idx = np.flatnonzero((keys[:, 0] == src) & (keys[:, 1] == prd))
        out.append((int(src) if by_source else None, int(prd) if per_label else None, idx))
    return out


def codes_fitted(
    pred_label: np.ndarray,
    config: DistillConfig,
    *,
    source_label: np.ndarray | None = None,
) -> int:
    """How many of the error codes (predicted labels [M]) `distill` fits its mixtures on: all
    of them while they fit under `resolved_max_codes` (per predicted label with `per_label`,
    per source class where the codes hold their class: `source_label` given)."""
    pred_label = np.asarray(pred_label)
    cap = resolved_max_codes(config)
    by_source = source_label is not None
    src = np.asarray(source_label) if by_source else np.zeros_like(pred_label)
    groups = _groups(src, pred_label, per_label=config.per_label, by_source=by_source)
    sizes = [len(idx) for _, _, idx in groups]
    return int(sum(min(int(n), cap) for n in sizes if n >= max(config.min_codes, 2)))


def _components(num_codes: int, config: DistillConfig, share: float) -> int:
    # A group's mixture gets its share of the components (a class's codes with a conditional
    # VAE; the reference's 100 for one group of every code): 100 on each of ten classes' codes
    # spread each class so thin that few components passed `weight_cutoff`.
    return int(min(math.ceil(config.n_components * share), max(1, num_codes // 2)))


class _Group(NamedTuple):
    """A set of codes `distill` fits one mixture on."""

    number: int  # its place among every group (its mixture's seed offset)
    source: int | None  # the source class it holds (behind a conditional VAE), or None
    label: int | None  # the predicted class it holds (`per_label`), or None
    idx: np.ndarray  # [G] its codes
    fit_idx: np.ndarray  # [<= G] those its mixture is fitted on (at most max_codes)
    component_share: float  # its share of the components (`_components`)


class ProgramSize(NamedTuple):
    """The size one compiled mixture program is built for, shared by a distill's groups."""

    rows: int  # the most codes a group fits on
    components: int  # the most components a group gets


def _fit_mixture(
    x: np.ndarray,
    config: DistillConfig,
    seed: int,
    *,
    share: float = 1.0,
    program: ProgramSize | None = None,
):
    k = _components(len(x), config, share)
    # On one device, also over several processes (each fits the same rows the same way): a fit
    # sharded over devices sums its statistics in an order that depends on the topology, and
    # the regions would then differ in the last bits between 1 x 4 and 2 x 2 devices. A few
    # thousand codes of a few dimensions are no work to shard.
    common = dict(
        n_components=k, covariance_type="full", max_iter=config.max_iter, random_state=seed,
    )  # fmt: skip
    if program is not None:  # one compiled program for every group (each compile takes seconds)
        common.update(program_rows=program.rows, program_components=program.components)
    if config.method == "dpgmm":
        model = BayesianGaussianMixture(**common)
    elif config.method == "gmm":
        model = GaussianMixture(**common)
    else:
        raise ValueError(f"Unknown distill method {config.method!r}; use 'dpgmm' or 'gmm'.")
    # A fit stopped by max_iter is recorded (`Regions.fits`) and reported by the distill stage,
    # rather than warned about from inside the library where no run directory keeps it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x)


def _fit_group(
    x: np.ndarray,
    config: DistillConfig,
    seed: int,
    *,
    share: float,
    alone: bool,
    program: ProgramSize | None,
):
    """`_fit_mixture`, or, for one of several groups (a class's codes behind a conditional VAE,
    a label's with `per_label`) whose codes are too few or too close together for its share of
    the components (an ill-defined covariance), one component; None when even that fails: the
    group forms no region, like a group with fewer than `min_codes` codes. One group alone
    (every code) raises: then there is nothing else to distill."""
    try:
        return _fit_mixture(x, config, seed, share=share, program=program)
    except IllDefinedCovarianceError:
        if alone:
            raise
    try:
        one = dataclasses.replace(config, n_components=1)
        return _fit_mixture(x, one, seed, program=program)
    except IllDefinedCovarianceError:
        return None


def distill(
    codes: np.ndarray,
    source_label: np.ndarray,
    pred_label: np.ndarray,
    *,
    num_classes: int,
    config: DistillConfig,
    predict_fn: Callable[[jax.Array], jax.Array] | None = None,
    free_dims: int | None = None,
) -> Regions:
    """Fit the mixture on the error codes and keep the regions that pass the cutoffs.

    Args:
        codes: [M, L] latent codes of the errors.
        source_label: [M] true labels of their source points.
        pred_label: [M] the classifier's predictions on them.
        num_classes: number of classes (for the label histograms).
        config: distillation settings.
        predict_fn: optional `z [B, L] -> predicted class [B]` (decode + classify) used to
            measure each region's error rate on fresh samples.
        free_dims: codes whose coordinates after the first `free_dims` hold the source class
            (a conditional VAE's class block, `models.style_dims`): one mixture per source
            class on the first `free_dims`, each region keeping its class block (with no
            variance there). None: one mixture on every coordinate.

    Returns:
        `Regions`; each record holds id, num_codes, weight, mean, covariance, source/predicted
        label histograms, majority source label and (with `predict_fn`) `error_rate`.

    Raises:
        ValueError: no codes, or fewer codes than `min_codes` (nothing to distill).
    """
    codes = np.asarray(codes, np.float32)
    m = len(codes)
    if codes.ndim != 2 or m == 0:
        raise ValueError(
            "No error codes to distill: the search found no misclassified samples. Widen the "
            "search (larger perturbation scale or more samples per source) and rerun."
        )
    if m < config.min_codes:
        raise ValueError(
            f"Only {m} error codes, fewer than min_codes={config.min_codes}: too few to form a "
            "region. Search more (more samples or sources) or lower min_codes."
        )
    max_codes = resolved_max_codes(config)
    rng = np.random.default_rng(config.seed)
    L = codes.shape[1]
    free = L if free_dims is None else int(free_dims)
    groups = _groups(
        np.asarray(source_label), np.asarray(pred_label), per_label=config.per_label,
        by_source=free_dims is not None,
    )  # fmt: skip
    fitted = []
    for g, (source, label, idx) in enumerate(groups):
        if len(idx) < max(config.min_codes, 2):
            continue
        fit_idx = idx if len(idx) <= max_codes else rng.choice(idx, max_codes, replace=False)
        # a class's group gets its share of the components
        share = len(idx) / m if source is not None else 1.0
        fitted.append(_Group(g, source, label, idx, fit_idx, share))
    # Several groups share one program, compiled for the largest of them: a CPU spends seconds
    # compiling each size and milliseconds fitting it (ten classes: 31 s -> ~5 s).
    program = None
    if len(fitted) > 1:
        program = ProgramSize(
            rows=max(len(f.fit_idx) for f in fitted),
            components=max(_components(len(f.fit_idx), config, f.component_share) for f in fitted),
        )
    means, covs, weights, members, fits = [], [], [], [], []
    for g, source, label, idx, fit_idx, component_share in fitted:
        share = len(idx) / m  # the group's share of the codes
        model = _fit_group(
            codes[fit_idx, :free],
            config,
            config.seed + g,
            share=component_share,
            alone=len(groups) == 1,
            program=program,
        )
        if model is None:
            continue
        fits.append(
            {"label": label, **({} if source is None else {"source_label": source}),
             "codes": int(len(fit_idx)), "converged": bool(model.converged_),
             "n_iter": int(model.n_iter_), "max_iter": config.max_iter}
        )  # fmt: skip
        fixed = codes[idx[0], free:]  # the group's class block (empty without one)
        comp = np.asarray(model.predict(codes[idx, :free]))
        for c in range(len(model.weights_)):
            w = float(model.weights_[c]) * share
            if w <= config.weight_cutoff:
                continue
            mine = idx[comp == c]
            if len(mine) < config.min_codes:
                continue
            means.append(np.concatenate([np.asarray(model.means_[c], np.float32), fixed]))
            cov = np.zeros((L, L), np.float32)
            cov[:free, :free] = model.covariances_[c]
            covs.append(cov)
            weights.append(w)
            members.append(mine)
    order = np.argsort([-len(x) for x in members], kind="stable")
    assignment = np.full(m, -1, np.int32)
    records = []
    for r, o in enumerate(order):
        assignment[members[o]] = r
        src = np.bincount(source_label[members[o]], minlength=num_classes)
        prd = np.bincount(pred_label[members[o]], minlength=num_classes)
        pairs = source_label[members[o]].astype(np.int64) * num_classes + pred_label[members[o]]
        pair_counts = np.bincount(pairs)
        top = int(pair_counts.argmax())
        records.append(
            {
                "id": r,
                "num_codes": int(len(members[o])),
                "weight": float(weights[o]),
                "mean": means[o].tolist(),
                "covariance": covs[o].tolist(),
                "source_label_counts": src.tolist(),
                "pred_label_counts": prd.tolist(),
                "majority_source_label": int(src.argmax()),
                "majority_pred_label": int(prd.argmax()),
                # the region's most common (source, predicted) pair (not always the two
                # majorities side by side: those may never occur together), and its share
                "top_pair": [top // num_classes, top % num_classes],
                "purity": float(pair_counts[top] / len(pairs)),
            }
        )
    regions = Regions(
        means=np.stack([means[o] for o in order]) if records else np.zeros((0, L), np.float32),
        covariances=np.stack([covs[o] for o in order])
        if records
        else np.zeros((0, L, L), np.float32),
        weights=np.asarray([weights[o] for o in order], np.float32),
        assignment=assignment,
        records=records,
        fits=fits,
    )
    if predict_fn is not None and records:
        key = jax.random.key(config.seed)
        z = sample_regions(
            regions, jax.random.fold_in(key, 1), config.error_samples, tau=config.tau
        )
        preds = np.asarray(predict_fn(jnp.asarray(z.reshape(-1, L)))).reshape(len(records), -1)
        for rec, p in zip(records, preds, strict=True):
            rec["error_rate"] = float(np.mean(p != rec["majority_source_label"]))
            rec["error_region"] = rec["error_rate"] >= config.min_error_rate
    return regions


def top_pair(record: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(source, predicted): a region record's most common pair, the one its purity counts; a
    record from before it was kept gives the two majorities."""
    pair = record.get("top_pair")
    if pair:
        return pair[0], pair[1]
    return record.get("majority_source_label"), record.get("majority_pred_label")


def no_region_note(num_codes: int, num_regions: int, config: DistillConfig) -> str | None:
    """What a run says when the mixture kept none (`num_regions` 0) of `num_codes` error codes,
    enough to fit it (at least min_codes and 2); None otherwise."""
    if num_regions or num_codes < max(config.min_codes, 2):
        return None
    note = (
        f"the mixture kept no region of the {num_codes} error codes: no component holds more "
        f"than weight_cutoff={config.weight_cutoff} of them and min_codes={config.min_codes}. "
        "Lower --distill-weight-cutoff or --distill-min-codes"
    )
    if config.per_label:
        # Measured on Fashion-MNIST 10k (12,281 codes): 100 components per predicted class keep
        # none; 3 keep 28 regions.
        note += (
            f", or give each predicted class's mixture fewer components (per_label: "
            f"n_components={config.n_components} spreads a class's codes thin; try 3)"
        )
    return note


def not_converged_note(max_iter: int) -> str:
    """What a run says when a mixture fit stopped at `max_iter` (`Regions.converged` False)."""
    return (
        f"the mixture fit stopped at max_iter={max_iter} before it converged: the regions are "
        "those of its last iteration (raise --distill-max-iter to fit on)"
    )


def is_error_region(record: dict[str, Any]) -> bool:
    """Whether a region record is an error region (True when its error rate was not sampled)."""
    return bool(record.get("error_region", True))


def region_cholesky(regions: Regions, *, tau: float) -> np.ndarray:
    """[R, L, L] lower Cholesky factors of tau * covariance (jitter added if needed)."""
    L = regions.means.shape[1]
    cov = tau * regions.covariances.astype(np.float64) + 1e-9 * np.eye(L)
    return np.linalg.cholesky(cov).astype(np.float32)


@functools.partial(jax.jit, static_argnames="n")
@exact  # a sampling law, not a forward pass: TF32 would distort the covariance
def draw_region_codes(means: jax.Array, chol: jax.Array, key: jax.Array, *, n: int) -> jax.Array:
    """means [R, L], chol [R, L, L] lower factors -> [R, n, L] codes mean + chol @ eps."""
    eps = jax.random.normal(key, (means.shape[0], n, means.shape[1]), jnp.float32)
    return means[:, None, :] + jnp.einsum("rij,rnj->rni", chol, eps)


def sample_regions(regions: Regions, key: jax.Array, n: int, *, tau: float) -> np.ndarray:
    """Draw n codes per region from N(mean, tau * cov): [R, n, L]."""
    chol = jnp.asarray(region_cholesky(regions, tau=tau))
    return np.asarray(draw_region_codes(jnp.asarray(regions.means), chol, key, n=n))


def save_regions(regions: Regions, directory: str) -> None:
    """Write regions.npz (arrays) and regions.json (records) into `directory`."""
    write_npz(
        os.path.join(directory, "regions.npz"),
        means=regions.means,
        covariances=regions.covariances,
        weights=regions.weights,
        assignment=regions.assignment,
    )
    with atomic_write(os.path.join(directory, "regions.json")) as f:
        json.dump({"regions": regions.records, "fits": regions.fits}, f, indent=1)


def load_regions(directory: str) -> Regions:
    with np.load(os.path.join(directory, "regions.npz"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with open(os.path.join(directory, "regions.json")) as f:
        saved = json.load(f)
    return Regions(records=saved["regions"], fits=saved.get("fits", []), **arrays)
