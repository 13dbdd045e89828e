"""Benchmark plumbing that a CPU run never reaches: an accelerator running out of memory."""

import pytest

from defuse_jax.bench import search_bench


def _raise(exc):
    def measure():
        raise exc

    return measure


def test_out_of_memory_becomes_a_row_and_the_benchmark_goes_on():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 14.2GiB")
    row = search_bench._unless_out_of_memory(_raise(oom), chains=65536, chunk=32768)
    assert row == {"chains": 65536, "chunk_size": 32768, "error": "out of memory"}
    ok = search_bench._unless_out_of_memory(lambda: {"samples_per_s": 1.0}, chains=1, chunk=1)
    assert search_bench._measured([row, ok]) == [ok]


def test_other_errors_are_not_swallowed():
    with pytest.raises(ValueError, match="bad shape"):
        search_bench._unless_out_of_memory(_raise(ValueError("bad shape")), chains=1, chunk=1)


def test_every_size_out_of_memory_is_a_clear_error():
    rows = [{"chains": 8, "chunk_size": c, "error": "out of memory"} for c in (1, 2)]
    with pytest.raises(RuntimeError, match="smaller --chunk-sizes"):
        search_bench._measured(rows)
