"""The search stage: encode test points, run the latent search, save the errors found.

Writes `errors.npz` (codes and their metadata, read with allow_pickle=False) and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from defuse_jax import models
from defuse_jax.batching import map_batches
from defuse_jax.data import Dataset
from defuse_jax.files import make_dirs, write_json, write_npz
from defuse_jax.models import Params
from defuse_jax.search import SearchConfig, SearchResult, latent_search
from defuse_jax.search.config import source_readers
from defuse_jax.search.scale_choice import ScaleChoice, choose_scale

# The candidate scales behind a conditional VAE when none are given (`RunConfig.search_scales`):
# its style codes carry less than an unconditional VAE's codes, and its pilot chose 2 on 8x8
# digits (where 0.5 kept 2 codes from 450 sources) and 0.5 on Fashion-MNIST (docs/results.md).
CONDITIONAL_SCALES = (0.5, 1.0, 2.0, 4.0)


def candidate_scales(scales: Sequence[float] | None, vae: Params) -> tuple[float, ...] | None:
    """The scales the search stage's pilot chooses from: `scales` if given, else
    `CONDITIONAL_SCALES` behind a conditional VAE; None: search at `SearchConfig.scale`."""
    if scales:
        return tuple(scales)
    return CONDITIONAL_SCALES if models.style_dims(vae) is not None else None


ERROR_FIELDS = ("z", "source_index", "source_label", "pred_label", "prob", "perturbation_norm")


_mean_code = jax.jit(models.mean_code)


def encode_sources(
    vae: Params, x: np.ndarray, y: np.ndarray | None = None, *, batch_size: int = 1024
) -> np.ndarray:
    """Latent codes of images x: [N, H, W, C] at their posterior means -> [N, L]; a conditional
    VAE's code also holds the class, so it needs their labels y: [N]."""
    if len(x) == 0:
        raise ValueError("encode_sources: no images to encode.")
    if y is None:
        return map_batches(lambda b: _mean_code(vae, b["x"]), {"x": x}, batch_size=batch_size)
    data = {"x": x, "y": np.asarray(y, np.int32)}
    return map_batches(lambda b: _mean_code(vae, b["x"], b["y"]), data, batch_size=batch_size)


class SearchInputs(NamedTuple):
    """What `run_search` passes to `latent_search`, built once (a benchmark calls the search
    again on them: new functions would be traced and compiled anew)."""

    decode_fn: Callable[[jax.Array], jax.Array]  # z [B, L] -> images
    classify_fn: Callable[[jax.Array], jax.Array]  # images -> logits [B, C]
    z0: np.ndarray  # [N, L] the sources' codes
    y0: np.ndarray  # [N] int32 their labels
    idx: np.ndarray  # [N] the sources' indices in the test split
    kwargs: dict[str, Any]  # key, mesh, validity_fn, free_dims


def search_inputs(
    ds: Dataset,
    vae: Params,
    classifier: Params,
    *,
    search: SearchConfig,
    max_sources: int | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    validity: Sequence[Params] | None = None,
) -> SearchInputs:
    """The sources, functions and keyword arguments of the search stage's `latent_search`
    (`run_search`'s arguments, which it documents)."""
    n = len(ds.x_test)
    idx = np.arange(n)
    if max_sources is not None and max_sources < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_sources, replace=False))
    y0 = ds.y_test[idx].astype(np.int32)
    z0 = encode_sources(vae, ds.x_test[idx], y0)
    decode_fn, classify_fn = models.search_functions(
        vae, classifier, compute_dtype=search.compute_dtype
    )
    validity_fn = None
    if validity is not None:
        validity_fn = models.validity_function(validity, compute_dtype=search.compute_dtype)
    kwargs = dict(key=jax.random.key(search.seed), mesh=mesh, validity_fn=validity_fn,
                  free_dims=models.style_dims(vae))  # fmt: skip
    return SearchInputs(decode_fn, classify_fn, z0, y0, idx, kwargs)


def run_search(
    ds: Dataset,
    vae: Params,
    classifier: Params,
    *,
    search: SearchConfig,
    max_sources: int | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    validity: Sequence[Params] | None = None,
    scales: Sequence[float] | None = None,
) -> tuple[SearchResult, np.ndarray, ScaleChoice | None]:
    """Search from the test points; returns (result, indices of the test points used as
    sources, the pilot's choice of scale or None).

    Args:
        ds: the dataset (sources are its test points).
        vae: the trained VAE; classifier: the trained classifier.
        search: the search configuration.
        max_sources: search from at most this many test points (a seeded subset; None: all).
            Points the classifier gets wrong at their code are skipped by the search itself.
        seed: seed of that subset.
        mesh: devices to shard the search over (default: all).
        validity: the classifiers that must all still read the source class for a flip to
            count (`SearchConfig.validity`: the oracle, one ensemble per shift it trained
            with, `train_models.load_shift_groups`), or None.
        scales: candidate scales: search at the one a pilot chooses (`choose_scale`) instead
            of `search.scale`; None: `search.scale`.
    """
    inputs = search_inputs(ds, vae, classifier, search=search, max_sources=max_sources,
                           seed=seed, mesh=mesh, validity=validity)  # fmt: skip
    fns, common = (inputs.decode_fn, inputs.classify_fn, inputs.z0, inputs.y0), inputs.kwargs
    choice = None
    if scales:
        choice = choose_scale(*fns, config=search, scales=scales, seed=seed, **common)
        search = dataclasses.replace(search, scale=choice.scale)
    result = latent_search(*fns, config=search, **common)
    return result, inputs.idx, choice


def thin_search_note(summary: Mapping[str, Any], search: SearchConfig) -> str | None:
    """What to do when the search skipped every source, or when a search with a validity model
    kept fewer codes than it searched sources (its regions are then thin, or there are none);
    None otherwise."""
    kept, used = summary["num_errors_found"], summary["num_sources_used"]
    if used == 0 and summary.get("num_sources", 0) > 0:
        return (
            f"Every source was skipped: {source_readers(search.validity)} misreads each one's "
            "decoded latent code, so the search evaluated nothing. The VAE's reconstructions "
            "may be too poor to classify (train it longer: --vae-epochs)"
            + (", or search without the constraint: --search-validity none."
               if search.validity != "none" else ".")
        )  # fmt: skip
    if search.validity == "none" or kept >= used:
        return None
    per_source = summary["num_samples_evaluated"] // max(1, used)
    return (
        f"The validity constraint ({search.validity}) kept {kept:,} error codes from {used:,} "
        f"searched sources, fewer than one each at {per_source:,} samples per "
        "source, so the regions are thin (on digits at 100 samples per source a seed found no "
        "region). Raise --search-num-samples: 1,000 keeps about five codes per source on digits."
    )


def save_search(
    result: SearchResult,
    test_index: np.ndarray,
    directory: str,
    *,
    scale_choice: ScaleChoice | None = None,
) -> dict[str, Any]:
    """Write errors.npz and summary.json (with the pilot's choice of scale, if one was made);
    returns the summary."""
    make_dirs(directory)
    arrays = {f: np.asarray(getattr(result, f)) for f in ERROR_FIELDS}
    # Map source indices back to test-set indices so the errors can be traced to images.
    arrays["test_index"] = test_index[arrays["source_index"]].astype(np.int32)
    write_npz(os.path.join(directory, "errors.npz"), **arrays)
    summary = {
        "num_sources": int(len(test_index)),
        "num_sources_used": int(result.num_sources_used),
        "num_sources_skipped": int(result.num_sources_skipped),
        "num_samples_evaluated": int(result.num_samples_evaluated),
        "num_flips": int(result.num_flips),
        "num_errors_found": int(result.num_found),
        "wall_time_s": float(result.wall_time_s),
        "config": dataclasses.asdict(result.config),
    }
    if scale_choice is not None:
        summary["scale_choice"] = scale_choice._asdict()
    write_json(os.path.join(directory, "summary.json"), summary)
    return summary


def load_errors(directory: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, "errors.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
