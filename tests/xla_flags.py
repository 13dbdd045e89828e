"""XLA flags for the test suite's processes: conftest.py's, and the subprocesses tests start."""

# LLVM's optimisation of the generated CPU code is most of XLA's compile time, and the suite's
# programs are compiled far more often than they run for long: without it, test_training.py
# and test_pipeline_tfds.py took 117 s instead of 169 s, test_sweep.py and
# test_mixture_sklearn_checks.py 152 s instead of 211 s (2-core CPU). It changes the machine
# code, not the HLO; every comparison the suite makes is between processes with these flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process with `devices` forced CPU devices (None: XLA's one)."""
    forced = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    return " ".join([*forced, FAST_COMPILE])
