"""The search across processes: 2 processes x 2 CPU devices give what 4 local devices give.

This is the path used on several hosts after `jax.distributed.initialize()` (global input arrays
from `make_array_from_callback`, outputs gathered with `process_allgather`), run here as two
local processes talking over gloo.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_search import IDS, MODES, _sources, classify, decode
from xla_flags import xla_flags

from defuse_jax.search import latent_search

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(script: str, args: list[list[str]], logs: list[pathlib.Path]) -> list:
    """One process per entry of `args` (`python script *args[i]`), each with 2 CPU devices,
    its output in logs[i] (files: a full pipe cannot block)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", DEFUSE_JAX_CACHE_DIR="off", MPLBACKEND="Agg")
    env["XLA_FLAGS"] = xla_flags(2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = []
    for a, log in zip(args, logs, strict=True):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-u", script, *a], env=env, stdout=f, stderr=subprocess.STDOUT
                )
            )
    return procs


def wait_for(procs: list, timeout_s: float, *, stop_on_failure: bool = True) -> None:
    """Wait until every process exited, or (`stop_on_failure`) one failed (the others would wait
    for it until a timeout), or `timeout_s` passed; then kill those still running."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            failed = stop_on_failure and any(c not in (None, 0) for c in codes)
            if None not in codes or failed:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def failures(procs: list, logs: list[pathlib.Path]) -> str:
    """What went wrong in the processes that did not exit with 0 ("" if none)."""
    return "\n".join(
        f"worker {i} exited with {p.returncode}:\n{log.read_text()[-3000:]}"
        for i, (p, log) in enumerate(zip(procs, logs, strict=True))
        if p.returncode != 0
    )


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    port = str(free_port())
    logs = [out / f"p{i}.log" for i in range(2)]
    procs = start_workers(WORKER, [[port, str(i), str(out / f"p{i}.npz")] for i in range(2)], logs)
    wait_for(procs, 300)
    failed = failures(procs, logs)
    assert not failed, failed
    return [dict(np.load(out / f"p{i}.npz")) for i in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(IDS)), ids=IDS)
def test_two_processes_equal_one_process(two_process_results, index):
    assert len(jax.devices()) >= 4, "conftest forces 4 CPU devices"
    z0, y0 = _sources()
    local = latent_search(decode, classify, z0, y0, key=jax.random.key(0), config=MODES[index])
    assert local.num_found > 0  # the comparison below is not between two empty results
    p0, p1 = two_process_results
    for name, a in p0.items():  # every process gets the whole result
        np.testing.assert_array_equal(a, p1[name], err_msg=name)
    for f in ("source_index", "pred_label", "flips_per_source", "used"):
        np.testing.assert_array_equal(p0[f"{IDS[index]}.{f}"], getattr(local, f), err_msg=f)
    for f in ("z", "prob", "perturbation_norm"):
        np.testing.assert_allclose(
            p0[f"{IDS[index]}.{f}"], getattr(local, f), rtol=1e-5, atol=1e-6, err_msg=f
        )
