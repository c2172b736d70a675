"""Multi-process training on CPU: two processes joined by `jax.distributed` train exactly like one.

Every run is the real CLI (`python -m c2c_jax.train --config=configs/tiny.py`) in fresh processes, started
the way the multi-node launch scripts start it:

* "one process": 1 process x 4 CPU devices;
* "two processes": 2 processes x 2 CPU devices, joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID (`sharding.maybe_initialize_distributed`), with gloo CPU collectives between them.

Both see 4 devices, the same (data=4, fsdp=1) mesh, the same global batch of 8 sequences per step (2 micro-
batches of 4, one row per device) and the same seeds, so they run the same partitioned program: what differs
is only that in the two-process run each process feeds its own rows (`BatchIterator(process_index,
process_count)` + `make_array_from_process_local_data`) and the gradient all-reduce crosses a process boundary.
Any mistake in how rows are split between processes or how the global batch is assembled would change the
per-step losses by far more than the tolerances below.

Tolerances: the gloo all-reduce may sum the four per-device gradients in another order than the in-process
CPU collectives, so results may differ in the last bits of float32 (observed: at most a few ulp in the loss).
Losses are compared at rtol 1e-5, parameters at atol 1e-5 (observed: <= 3e-7 after 4 steps). Both are far
below what a real mistake does: with both processes feeding process 0's rows (tried by patching
BatchIterator), the four losses move by 1e-2 to 1e-1 (relative 1e-3 to 2e-2); and Adam moves every parameter
by about lr * sign(grad) = 1e-3 per step, so any divergent gradient shows up 100x above the parameter
tolerance.

Checkpoints: a two-process checkpoint (step 2 of 4) resumes in one process and a one-process checkpoint
resumes in two; both continue to the same steps 3-4 losses and final fuser as the uninterrupted run.

All processes compile with --xla_backend_optimization_level=0 (LLVM optimisation off: about half the compile
time, which dominates these runs), so the file takes about a minute on two cores. The XLA flags are identical
in every run, apart from the device count.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cpu_flags import cpu_xla_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # optimizer steps per run; checkpoints at 2 and 4
RESUME_STEP = 2
DEVICES = 4  # in total, in every run
PARAM_ATOL = 1e-5  # 1% of configs/tiny.py's learning rate (1e-3)
LOSS_RTOL = 1e-5
RUN_TIMEOUT_S = 1800  # a guard against a hung collective (peers wait forever), not a speed limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "c2c_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.train.max_steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=100000",
            "--config.data.eval_fraction=0.0", f"--config.ckpt.every={RESUME_STEP}", "--config.ckpt.keep=2"]


def _env(devices_per_process: int, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "SLURM_")) and k != "C2C_DISTRIBUTED"}
    env.update(
        PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        XLA_FLAGS=cpu_xla_flags(devices_per_process),
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env.update(extra)
    return env


def train(workdir: Path, processes: int) -> dict:
    """Runs the training CLI as `processes` processes over DEVICES CPU devices; returns a JSON-able record."""
    devices = DEVICES // processes
    port = _free_port()
    logs, procs = [], []
    start = time.perf_counter()
    for i in range(processes):
        extra = {}
        if processes > 1:
            extra = dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                         JAX_PROCESS_ID=str(i))
        log = workdir.parent / f"{workdir.name}.process{i}.log"
        logs.append(log)
        with open(log, "w") as f:
            procs.append(subprocess.Popen(_train_command(workdir), cwd=ROOT, env=_env(devices, **extra),
                                          stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break  # a peer would wait for the failed process forever
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:  # a peer failed or the run hung: stop the processes started here
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0] * processes:
        tails = "\n".join(f"--- process {i} (exit {c}):\n" + log.read_text()[-3000:]
                          for i, (c, log) in enumerate(zip(codes, logs)))
        raise RuntimeError(f"{processes}-process training in {workdir} failed or timed out:\n{tails}")
    history = json.loads((workdir / "train_summary.json").read_text())["history"]
    return dict(losses={str(h["step"]): h["loss"] for h in history}, workdir=str(workdir),
                logs=[str(log) for log in logs], seconds=round(time.perf_counter() - start, 1))


def checkpoint_copy(src: Path, dst: Path, step: int) -> Path:
    """`dst`: a fresh workdir holding only `src`'s checkpoint at `step` (as if the run had stopped there)."""
    shutil.copytree(src / "checkpoints", dst / "checkpoints",
                    ignore=lambda d, names: [n for n in names if Path(d) == src / "checkpoints" and n.isdigit()
                                             and int(n) != step])
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def run_all(base: Path) -> dict:
    """The four runs, in dependency order (each resumed run needs the other topology's checkpoint)."""
    out = {"one": train(base / "one", 1), "two": train(base / "two", 2)}
    out["two_from_one"] = train(checkpoint_copy(base / "one", base / "two_from_one", RESUME_STEP), 2)
    out["one_from_two"] = train(checkpoint_copy(base / "two", base / "one_from_two", RESUME_STEP), 1)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`run_all`'s records, computed once per test session even when pytest-xdist spreads this file's tests
    over several workers (they share the session's temporary root; a file lock lets one worker compute)."""
    from filelock import FileLock
    from safetensors.numpy import load_file

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # this session's root, shared by its workers
    else:
        root = tmp_path_factory.getbasetemp()
    base, done = root / "multiprocess_runs", root / "multiprocess_runs.json"
    with FileLock(str(root / "multiprocess_runs.lock")):
        if not done.exists():
            base.mkdir(exist_ok=True)
            try:
                records = run_all(base)
            except RuntimeError as e:
                records = {"error": str(e)}
            done.write_text(json.dumps(records, indent=2))
    records = json.loads(done.read_text())
    if "error" in records:
        pytest.fail(records["error"])
    for name, r in records.items():
        print(f"{name}: {r['seconds']} s, losses {r['losses']}")
        r["losses"] = {int(k): v for k, v in r["losses"].items()}
        r["log"] = Path(r["logs"][0]).read_text()
        r["fuser"] = load_file(str(Path(r["workdir"]) / "final" / "fuser.safetensors"))
    return records


def assert_same_fuser(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_two_processes_train_like_one(runs):
    one, two = runs["one"], runs["two"]
    # The two-process run really was two processes over gloo, on one 4-device mesh.
    assert "Gloo" in two["log"] or "gloo" in two["log"], two["log"][-2000:]
    assert list(one["losses"]) == list(two["losses"]) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two["losses"][s] for s in one["losses"]], list(one["losses"].values()), rtol=LOSS_RTOL)
    # Not a trivially constant loss: the steps see different batches.
    assert len({round(v, 4) for v in one["losses"].values()}) == STEPS
    assert_same_fuser(two["fuser"], one["fuser"])


def test_two_process_checkpoint_resumes_in_one_process(runs):
    resumed, reference = runs["one_from_two"], runs["two"]
    assert list(resumed["losses"]) == list(range(RESUME_STEP + 1, STEPS + 1)), "did not resume at the checkpoint"
    np.testing.assert_allclose([resumed["losses"][s] for s in resumed["losses"]],
                               [reference["losses"][s] for s in resumed["losses"]], rtol=LOSS_RTOL)
    assert_same_fuser(resumed["fuser"], reference["fuser"])
    assert_same_fuser(resumed["fuser"], runs["one"]["fuser"])


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    resumed, reference = runs["two_from_one"], runs["one"]
    assert list(resumed["losses"]) == list(range(RESUME_STEP + 1, STEPS + 1)), "did not resume at the checkpoint"
    np.testing.assert_allclose([resumed["losses"][s] for s in resumed["losses"]],
                               [reference["losses"][s] for s in resumed["losses"]], rtol=LOSS_RTOL)
    assert_same_fuser(resumed["fuser"], reference["fuser"])
