"""Which JAX backends a process may open, decided before JAX starts.

libtpu is installed wherever `c2c_jax.aot` compiles for TPUs, also on machines without TPUs. There,
JAX would still open libtpu when it starts its backends, fail to find a chip, fall back to the CPU,
and keep holding libtpu's one-process lock (/tmp/libtpu_lockfile) for as long as the process lives:
no TPU compile check could then run beside any other JAX process on the machine.
"""

from __future__ import annotations

import glob
import importlib.util
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are Google PCI devices (as jax's own Cloud TPU check reads them)


def has_tpu_chips() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def keep_jax_off_absent_tpus(environ=os.environ) -> None:
    """JAX_PLATFORMS=cpu when libtpu is installed but the machine has no TPU chip and no CUDA build of
    JAX (unless JAX_PLATFORMS is already set). Must run before JAX starts its backends."""
    if "JAX_PLATFORMS" in environ or importlib.util.find_spec("libtpu") is None or has_tpu_chips():
        return
    if any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    environ["JAX_PLATFORMS"] = "cpu"
