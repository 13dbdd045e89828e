"""The persistent compilation cache of the pipeline commands (defuse_jax.xla_cache)."""

import os
import subprocess
import sys

import pytest

from defuse_jax import cli, xla_cache

_ENV = ("DEFUSE_JAX_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"DEFUSE_JAX_CACHE_DIR": "off"}, None),
        ({"DEFUSE_JAX_CACHE_DIR": ""}, None),
        ({"DEFUSE_JAX_CACHE_DIR": "/data/xla", "JAX_COMPILATION_CACHE_DIR": "/j"}, "/data/xla"),
        ({"JAX_COMPILATION_CACHE_DIR": "/j"}, None),  # JAX's own variable: left to JAX
        ({"XDG_CACHE_HOME": "/c"}, "/c/defuse-jax/xla"),
        ({"HOME": "/h"}, "/h/.cache/defuse-jax/xla"),
    ],
)
def test_cache_dir_from_the_environment(monkeypatch, env, expected):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert xla_cache.cache_dir() == expected


@pytest.mark.parametrize(
    "argv, cached",
    [
        (["run"], True),
        (["search", "--out", "x"], True),
        (["train-classifier"], True),
        (["label"], True),
        (["info"], False),
        (["bench", "search"], False),  # benchmarks report compile times: never cached
        (["bench", "mixture"], False),
        (["sweep"], False),
    ],
)
def test_which_commands_use_the_cache(argv, cached):
    args = cli.build_parser().parse_args(argv)
    assert bool(getattr(args, "xla_cache", False)) is cached


_PROGRAM = """
import sys
import jax, jax.numpy as jnp
from defuse_jax.xla_cache import enable_compilation_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
)
assert enable_compilation_cache(sys.argv[1], min_compile_seconds=0) == sys.argv[1]
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)
print(float(f(jnp.ones((64, 64))).sum()), len(hits))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = str(tmp_path / "cache")
    env = {k: v for k, v in os.environ.items() if k not in _ENV}

    def run():
        proc = subprocess.run(
            [sys.executable, "-c", _PROGRAM, cache], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        value, hits = proc.stdout.split()
        return value, int(hits), sorted(os.listdir(cache))

    value1, hits1, files1 = run()
    assert hits1 == 0 and files1, "the first process should compile and store its program"
    value2, hits2, files2 = run()
    assert hits2 >= 1 and value2 == value1 and files2 == files1


def test_unwritable_cache_dir_leaves_the_cache_off(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert xla_cache.enable_compilation_cache(str(blocker / "xla")) is None
    assert "compilation cache off" in capsys.readouterr().err
