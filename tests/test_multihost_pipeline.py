"""The whole pipeline over 2 processes x 2 CPU devices (gloo), as on several hosts after
`defuse-jax run --distributed`: one worker is killed mid-training, the other stops with JAX's
error within its heartbeat timeout instead of hanging, a rerun resumes from the checkpoints, and
the resumed run's report equals, to the bit, a 1 process x 4 devices run of the same
configuration (`reduction_shards`).
"""

import json
import os
import re
import signal
import sys
import time

import jax
import pytest
from test_multihost import failures, free_port, start_workers, wait_for

from defuse_jax import cli, distributed, pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_pipeline_worker.py")
sys.path.insert(0, HERE)
from multihost_pipeline_worker import MICRO  # noqa: E402

HEARTBEAT_S = 10  # the worker's heartbeat timeout
# Timing fields, and the configuration (it lists the devices), differ between the runs.
NOT_COMPARED = {"stage_seconds", "seconds", "wall_time_s", "devices", "config"}


def _launch(out, name, *run_dirs):
    """Both workers on `run_dirs[0]`, or each on its own when two are given."""
    port = str(free_port())
    logs = [out / f"{name}-p{i}.log" for i in range(2)]
    dirs = run_dirs * 2 if len(run_dirs) == 1 else run_dirs
    args = [[port, str(i), dirs[i], str(out / f"{name}-writes{i}.json")] for i in range(2)]
    return start_workers(WORKER, args, logs), logs


def _has_checkpoint(ckpt_dir):
    return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-process run killed mid-training and its rerun, and a 1-process 4-device run."""
    out = tmp_path_factory.mktemp("multihost_pipeline")
    run_dir = str(out / "run")
    procs, killed_logs = _launch(out, "killed", run_dir)
    ckpt = os.path.join(run_dir, "train", "classifier", "ckpt")
    deadline = time.monotonic() + 240
    while not _has_checkpoint(ckpt) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), failures(procs, killed_logs)
        time.sleep(0.1)
    assert _has_checkpoint(ckpt), "no classifier checkpoint within 240 s"
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    wait_for(procs[:1], HEARTBEAT_S + 60)
    peer_exit = {"code": procs[0].returncode, "seconds": time.monotonic() - t_kill}
    procs[1].wait()

    procs, logs = _launch(out, "rerun", run_dir)
    wait_for(procs, 300)
    failed = failures(procs, logs)
    assert not failed, failed

    single = str(out / "single")
    assert len(jax.devices()) == 4, "conftest forces 4 CPU devices"
    pipeline.run(single, MICRO, log=lambda s: None)
    return {"out": out, "run": run_dir, "single": single, "peer_exit": peer_exit,
            "killed_logs": killed_logs, "logs": logs}  # fmt: skip


@pytest.mark.slow
def test_a_killed_worker_stops_its_peer_with_a_clear_error(runs):
    log = runs["killed_logs"][0].read_text()
    assert "pipeline finished" not in log
    assert runs["peer_exit"]["code"] not in (None, 0), "the peer did not stop"
    # JAX's coordination service names the dead process once it misses its heartbeats.
    assert "stopped sending heartbeats" in log, log[-3000:]
    assert runs["peer_exit"]["seconds"] < HEARTBEAT_S + 60


@pytest.mark.slow
def test_the_rerun_resumes_training_from_the_checkpoints(runs):
    for log in runs["logs"]:
        text = log.read_text()
        steps = [int(s) for s in re.findall(r"restored train/classifier/ckpt at step (\d+)", text)]
        assert steps and steps[0] > 0, text[-3000:]
        assert "pipeline finished" in text


def _compare(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in NOT_COMPARED:
                _compare(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _compare(x, y, f"{path}[{i}]")
    else:  # every float too: fixed-order gradient sums, the mixture on one device
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_two_processes_give_the_bits_of_one_process_with_four_devices(runs):
    with open(os.path.join(runs["single"], "report.json")) as f:
        single = json.load(f)
    with open(os.path.join(runs["run"], "report.json")) as f:
        multi = json.load(f)
    assert single["num_errors_found"] > 0 and single["num_regions"] >= 1  # not two empty runs
    assert not single["correction"]["skipped"]
    _compare(single, multi)
    assert len(multi["devices"]["devices"]) == 4
    for stage, name in (("search", "errors.npz"), ("distill", "regions.npz")):
        with open(os.path.join(runs["single"], stage, name), "rb") as f:
            want = f.read()
        with open(os.path.join(runs["run"], stage, name), "rb") as f:
            assert f.read() == want, name  # the codes and the mixture, to the bit


@pytest.mark.slow
def test_only_process_zero_writes_the_run_directory(runs):
    out = runs["out"]

    def written(process):
        paths = set()
        for name in ("killed", "rerun"):
            path = out / f"{name}-writes{process}.json"
            if path.exists():
                paths |= {rel for _, rel in json.loads(path.read_text())}
        return paths

    by_zero, by_one = written(0), written(1)
    # Process 1 writes only its part of Orbax's multi-host checkpoints.
    assert by_one and all("/ckpt/" in p for p in by_one), sorted(by_one)[:10]
    files = {
        os.path.relpath(os.path.join(d, f), runs["run"])
        for d, _, names in os.walk(runs["run"])
        for f in names
    }
    outputs = {f for f in files if "/ckpt/" not in f}
    assert "report.json" in outputs and "label/labels.csv" in outputs
    assert outputs <= by_zero, sorted(outputs - by_zero)


@pytest.mark.slow
def test_a_run_directory_that_is_not_shared_is_a_clear_error(tmp_path):
    # Process 1 is given another directory, as if it mounted something else at the path.
    procs, logs = _launch(tmp_path, "unshared", str(tmp_path / "a"), str(tmp_path / "b"))
    wait_for(procs, 120, stop_on_failure=False)  # both fail: wait for each one's own error
    for p, log in zip(procs, logs, strict=True):
        text = log.read_text()
        assert p.returncode == 3, text[-3000:]
        assert "is not shared: processes [1] cannot see what process 0 writes" in text
    assert not os.path.exists(tmp_path / "a" / "config.json")  # stopped before any stage


def test_a_bucket_run_directory_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="bucket paths such as gs:// are not supported"):
        pipeline.run("gs://bucket/run", MICRO)


def test_an_unreachable_coordinator_is_a_clear_error_in_bounded_time():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(distributed.DistributedError, match="Cannot reach the coordinator"):
        distributed.initialize(
            coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1, timeout_s=1
        )
    assert time.monotonic() - t0 < 10
    assert not jax.distributed.is_initialized()


def test_no_detected_cluster_is_a_clear_error():
    collectives = jax.config.jax_cpu_collectives_implementation
    with pytest.raises(distributed.DistributedError, match="pass --coordinator HOST:PORT"):
        distributed.initialize(timeout_s=5)
    assert not jax.distributed.is_initialized()
    assert jax.config.jax_cpu_collectives_implementation == collectives  # left as it was


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--coordinator", "127.0.0.1:1"], "add --distributed"),
        (["--distributed", "--coordinator", "127.0.0.1:1"], "Give all of --coordinator"),
        (["--distributed", "--coordinator", "nohost", "--num-processes", "2", "--process-id",
          "1"], "must be host:port"),
    ],
)  # fmt: skip
def test_distributed_flags_are_checked_before_anything_runs(argv, message, tmp_path, capsys):
    assert cli.main(["run", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
