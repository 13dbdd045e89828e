"""scripts/device_check.sh, the one prepared accelerator check, end to end in its CPU quick mode
(so that it cannot rot between the sessions that run it on a GPU)."""

import json
import os
import subprocess
import sys

import pytest
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("info", "digits", "conv", "mixture_100k", "mixture_1m", "ill_cond", "search", "train")


@pytest.mark.slow
def test_device_check_quick_mode_runs_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # one device, as on a GPU
    env.update(QUICK="1", OUT=str(out), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files  # what the device tool brings back
    steps = json.loads((out / "steps.json").read_text())
    assert [s["step"] for s in steps["steps"]] == list(STEPS) and steps["ok"]
    for name in ("digits", "conv"):
        report = json.loads((out / f"{name}_report.json").read_text())
        assert report["num_samples_evaluated"] > 0 and report["test_accuracy_after"] is not None
    mixture = json.loads((out / "mixture.json").read_text())
    assert set(mixture) == {"100k", "1m"}
    ill = json.loads((out / "ill_conditioned.json").read_text())
    assert all(r["ok"] for r in ill["rows"]) and len(ill["rows"]) == 2
    search = json.loads((out / "search.json").read_text())
    assert [m["dtype"] for m in search["models"]] == ["float32", "bfloat16"]
    train = json.loads((out / "train.json").read_text())
    assert [r["role"] for r in train["rows"]] == ["classifier"]
    assert {"fit_scan", "fit_steps", "bare"} <= set(train["rows"][0])
    assert steps["info"]["backend"] == "cpu"
    assert "=== search: exit 0" in (out / "check.log").read_text()


def test_profile_script_quick_mode(tmp_path):
    """scripts/profile_search.py (device_check's opt-in `profile` step) on toy sizes: every
    part of the search and every conv formulation is timed."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "profile_search.py"), "--quick",
         "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prof = json.loads((tmp_path / "profile.json").read_text())
    (row,) = prof["mlp"]["float32"]["search"]
    parts = ("plan_ms", "program_device_inputs_ms", "program_and_fetch_ms", "compact_ms")
    assert row["found"] > 0 and all(row[p] > 0 for p in parts + ("total_ms",))
    conv = prof["conv"]["bfloat16"]
    assert {"phase", "native", "phase_conv_first_layer", "search"} <= set(conv)
    assert prof["engine_overhead"]["engine_ns_per_chain"] > 0
