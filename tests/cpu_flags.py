"""XLA flags for the tests' CPU processes (this one, set by conftest, and the subprocesses they start)."""


def cpu_xla_flags(devices: int) -> str:
    """`devices` virtual CPU devices, and LLVM's optimisations off: compiling, not running, is most of
    a tiny-model test's time, and this about halves it. Floating-point results are the same (no
    fast-math either way)."""
    return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
