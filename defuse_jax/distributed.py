"""One run over several processes (`jax.distributed`): joining the cluster, which process writes
the run directory, and the barriers that keep every process's view of it the same.

Every process runs the same command and computes the same thing; the devices of all processes
form one mesh (`jax.devices()`), over which training, the search and the mixture fit are
sharded. Files are process 0's: `files.atomic_write` and the other writers in `files` write
nothing on the other processes, and wait at a barrier before and after process 0 writes, so no
process reads a file while it is replaced, and every process sees it complete once the writer
returns. With one process (no `initialize`) all of this is a no-op.

Example:
    >>> from defuse_jax import distributed
    >>> distributed.initialize()  # Cloud TPU, SLURM, Open MPI: everything is detected
    >>> distributed.initialize(coordinator="10.0.0.1:8476", num_processes=2, process_id=1)
    >>> distributed.is_main()  # process 0
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import jax

DEFAULT_TIMEOUT_S = 300  # joining the cluster
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # a process silent this long is dead: the others stop
DEFAULT_BARRIER_TIMEOUT_S = 3600  # how long a process waits for the others at a barrier

_settings = {"barrier_timeout_s": DEFAULT_BARRIER_TIMEOUT_S, "checks": 0}


class DistributedError(RuntimeError):
    """The processes of a distributed run cannot work together (unreachable coordinator, a
    run directory some process cannot see, a barrier the others never reached)."""


def initialize(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
    barrier_timeout_s: int = DEFAULT_BARRIER_TIMEOUT_S,
) -> None:
    """Join the cluster (`jax.distributed.initialize`); a no-op if this process already has.

    Call it before anything else uses JAX. Without arguments the cluster is detected (Cloud TPU
    pod slices, SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`); the explicit form names the
    coordinator (process 0's "host:port"), the number of processes and this one's id. On CPU the
    processes talk over gloo.

    Args:
        coordinator: "host:port" of process 0 (None: detected).
        num_processes: processes in the run (None: detected).
        process_id: this process, in [0, num_processes) (None: detected).
        timeout_s: how long to wait for the coordinator and the other processes to join.
        heartbeat_timeout_s: a process silent this long is considered dead, and every other
            process then stops (JAX ends it with "Terminating process because the JAX
            distributed service detected fatal errors ... stopped sending heartbeats").
        barrier_timeout_s: how long a process waits at a barrier for the others.

    Raises:
        DistributedError: the coordinator cannot be reached within `timeout_s`, no cluster was
            detected, or the arguments do not describe one.
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and None in explicit:
        raise DistributedError(
            "Give all of --coordinator, --num-processes and --process-id (an explicit launch), "
            "or none of them (the cluster is detected)."
        )
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(
                f"--coordinator must be host:port (process 0's address), got {coordinator!r}."
            )
        if not 0 <= process_id < num_processes:
            raise DistributedError(
                f"--process-id must lie in [0, {num_processes}), got {process_id}."
            )
        if process_id != 0:  # process 0 starts the coordinator; the others must reach it
            _wait_for_coordinator(host, int(port), timeout_s)
    collectives = jax.config.jax_cpu_collectives_implementation
    if collectives in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # older JAX: none
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        )
    except (ValueError, RuntimeError) as e:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
        raise DistributedError(
            f"Cannot join a distributed run ({e}). Outside a detected cluster (Cloud TPU, SLURM, "
            "Open MPI), pass --coordinator HOST:PORT --num-processes N --process-id I."
        ) from e
    _settings["barrier_timeout_s"] = int(barrier_timeout_s)


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Return once `host:port` accepts a connection; raise DistributedError after `timeout_s`.

    jax.distributed.initialize aborts the process (no Python exception) when the coordinator
    stays unreachable; checking first lets the error say what to check.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"Cannot reach the coordinator {host}:{port} within {timeout_s:g} s ({e}). "
                    "Start process 0 (--process-id 0) with the same --coordinator, check the "
                    "address and that the port is open between the hosts, or raise "
                    "--distributed-timeout."
                ) from e
            time.sleep(0.5)


def is_distributed() -> bool:
    """Whether this process is one of several (after `initialize`)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_main() -> bool:
    """Whether this process writes the run directory: process 0, or the only process."""
    return not is_distributed() or jax.process_index() == 0


def describe() -> str:
    """ "process i of n" (or "one process"), for logs."""
    if not is_distributed():
        return "one process"
    return f"process {jax.process_index()} of {jax.process_count()}"


def barrier(name: str) -> None:
    """Wait until every process got here (a no-op with one process).

    Every process must pass the same barriers in the same order, as they do when they run the
    same code; `name` only labels the barrier in errors.

    Raises:
        DistributedError: the others did not arrive within the barrier timeout.
    """
    if not is_distributed():
        return
    from jax._src import distributed as jax_distributed  # the coordination service's barrier

    client = jax_distributed.global_state.client
    timeout_s = _settings["barrier_timeout_s"]
    try:
        client.wait_at_barrier(f"defuse_jax:{name}", timeout_s * 1000)
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError; re-raised with what it means
        raise DistributedError(
            f"{describe()} waited {timeout_s} s at barrier {name!r} but the other processes did "
            f"not arrive ({str(e).splitlines()[0]}). One of them failed or runs other code: see "
            "their logs; every process must run the same command."
        ) from e


def check_shared_directory(path: str) -> None:
    """Check that every process sees `path` as process 0 does (a shared file system).

    Process 0 creates `path` and a file with a random token in it; every process reads it back.

    Raises:
        DistributedError: on every process, naming those that cannot see the directory.
    """
    if not is_distributed():
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    _settings["checks"] += 1
    key = f"defuse_jax/shared_directory/{_settings['checks']}"
    if is_main():
        token = secrets.token_hex(8)
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".shared-check-{token}")
        with open(probe, "w") as f:
            f.write(token)
        client.key_value_set(f"{key}/token", token)
    barrier("shared directory written")
    token = client.blocking_key_value_get(f"{key}/token", 60_000)
    probe = os.path.join(path, f".shared-check-{token}")
    try:
        with open(probe) as f:
            seen = "ok" if f.read() == token else "another file"
    except OSError as e:
        seen = f"{type(e).__name__}: {e}"
    client.key_value_set(f"{key}/{jax.process_index()}", seen)
    barrier("shared directory read")
    if is_main():
        os.remove(probe)
    problems = {}
    for i in range(jax.process_count()):
        answer = client.blocking_key_value_get(f"{key}/{i}", 60_000)
        if answer != "ok":
            problems[i] = answer
    if problems:
        raise DistributedError(
            f"The run directory {path} is not shared: processes {sorted(problems)} cannot see "
            f"what process 0 writes there ({next(iter(problems.values()))}). Every process "
            "needs the same directory on a shared file system (NFS, Filestore, Lustre, a "
            "gcsfuse mount), at the same path."
        )
