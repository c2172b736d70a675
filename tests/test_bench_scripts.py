"""The GPU benchmark scripts run end to end at tiny shapes on the CPU, so the commands that
docs/performance.md gives keep working, and the scaling script's numerical check holds."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpu_flags import cpu_xla_flags

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name, *args, out_dir, devices=1):
    env = dict(os.environ, OUT=str(out_dir), JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_xla_flags(devices))
    proc = subprocess.run([sys.executable, str(BENCH / name), "--smoke", *args], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_data_parallel_training_matches_one_device(tmp_path):
    run_script("bench_scaling.py", "--steps", "2", "--micro-batches", "2", out_dir=tmp_path, devices=2)
    (result,) = [r for r in rows(tmp_path / "scaling.jsonl") if r.get("bench") == "scaling"]
    assert result["devices"] == 2 and result["micro_batches"] == 2 and len(result["losses_n"]) == 2
    assert result["max_loss_rel_diff"] < 1e-3
    assert result["max_param_abs_diff"] < 1e-4 * max(result["max_param_abs"], 1.0)


@pytest.mark.parametrize("script,args,output", [
    ("bench_train.py", ("--micro-batches", "2"), "train.jsonl"),
    ("bench_inference.py", ("--skip-torch", "--only", "models,fusion,ttft,ttft_parts,generate,decode_attention"),
     "inference.jsonl"),
])
def test_benchmark_scripts_report_rows(tmp_path, script, args, output):
    run_script(script, *args, out_dir=tmp_path)
    header = rows(tmp_path / output)[0]
    assert "device" in header and re.fullmatch(r"[0-9a-f]{12}", header["library"]), header
    measured = [r for r in rows(tmp_path / output) if "bench" in r and r.get("what") != "settings"]
    assert measured
    for row in measured:
        times = [v for k, v in row.items() if k.endswith("ms")]
        assert times and all(t > 0 for t in times), row


def test_profile_attributes_hlo_to_source_lines_and_phases(tmp_path):
    dump = tmp_path / "hlo"
    run_script("profile_kernels.py", "--what", "prefill,ttft,ttft_library", "--hlo-dump", str(dump), out_dir=tmp_path)
    sys.path.insert(0, str(BENCH))
    try:
        import profile_kernels
    finally:
        sys.path.remove(str(BENCH))
    sources, _, phases = profile_kernels.hlo_sources(str(dump))
    prefill = sources["jit_run"]  # bench_inference.prefill_fn's jitted `run`
    assert any(src.startswith("decoder.py:") and " rms_norm " in src for src in prefill.values())
    assert any("Attention.__call__" in src for src in prefill.values())
    # The C2C route's named scopes label its instructions, and the profile times each part (on the
    # CPU from XLA's thunks, which the trace records with their HLO ops).
    route = {"receiver_prefix", "sharer_prefix_0", "fusion", "suffix"}
    assert route <= set(phases["jit_ttft"].values())
    timeline = json.loads((tmp_path / "profile_ttft.json").read_text())["phases"]
    assert route <= set(timeline)
    for phase in route:
        assert 0 <= timeline[phase]["start_ms"] <= timeline[phase]["end_ms"] and timeline[phase]["kernels"] > 0
    assert timeline["fusion"]["start_ms"] >= timeline["receiver_prefix"]["start_ms"]
    # The library's route is two programs; the phases span both, the last token after fusion.
    library = json.loads((tmp_path / "profile_ttft_library.json").read_text())["phases"]
    assert route <= set(library)
    assert library["suffix"]["start_ms"] >= library["fusion"]["end_ms"]


def test_ab_runs_each_side_on_its_own_tree(tmp_path):
    base = tmp_path / "base"
    for part in ("c2c_jax", "bench"):
        shutil.copytree(BENCH.parent / part, base / part, ignore=shutil.ignore_patterns("__pycache__"))
    with open(base / "c2c_jax" / "__init__.py", "a") as f:
        f.write("# the base side\n")  # so the two sides' library digests differ
    env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu")
    flag = "--xla_gpu_experimental_force_split_k=1"
    proc = subprocess.run([sys.executable, str(BENCH / "ab.py"), "--base", str(base), "--rounds", "1",
                           f"--new-xla-flags={flag}", "--",
                           "bench/bench_inference.py", "--smoke", "--skip-torch", "--only", "ttft"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    digests = {}
    for side, root in (("base", base), ("new", BENCH.parent)):
        digests[side] = subprocess.run([sys.executable, "-c", "import common; print(common.library_digest())"],
                                       cwd=root / "bench", env=dict(env, PYTHONPATH=str(root)),
                                       capture_output=True, text=True, check=True).stdout.strip()
        run = summary["runs"][f"0_{side}"]
        assert (run["library"], run["returncode"]) == (digests[side], 0)
        assert (flag in run["xla_flags"]) == (side == "new"), run["xla_flags"]
    assert digests["base"] != digests["new"]
    ttft = summary["rows"]["bench=inference what=ttft tokens=32 batch=2"]
    assert all(len(ttft[field][side]) == 1 and ttft[field][side][0] > 0
               for field in ("c2c_ms", "receiver_only_ms") for side in ("base", "new"))


def test_serving_benchmark_reports_both_routes(tmp_path):
    run_script("bench_serve.py", "--clients", "2", "--seconds", "1", "--processes", "1", out_dir=tmp_path)
    measured = [r for r in rows(tmp_path / "serve.jsonl") if r.get("model")]
    assert [(r["load"], r["model"], r["clients"]) for r in measured] == [
        (load, model, 2) for load in ("open", "closed") for model in ("receiver", "c2c")]
    for row in measured:
        if row["load"] == "closed":  # two clients, one request in flight each: never more than two at once
            assert row["offered_rps"] is None and row["concurrency_max"] <= 2 and row["requests"] >= 2, row
        assert row["requests"] > 0 and row["failed"] == 0 and row["output_tokens_per_s"] > 0, row
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["itl_p50_ms"] <= row["itl_p99_ms"], row
        # From the server's metrics: a request waits for its prefill before its first token, so the
        # wait's distribution lies below the first token's at every bucket bound, and so do medians.
        assert 0 <= row["engine_queue_wait_p50_ms"] <= row["engine_ttft_p50_ms"], row
        assert row["engine_iterations"] > 0 and min(row["engine_iteration_ms"].values()) >= 0, row
        assert row["engine_iteration_ms"]["wait_decode"] > 0, row
    settings = next(r for r in rows(tmp_path / "serve.jsonl") if r.get("what") == "settings")
    assert all(ms > 0 for route in ("receiver", "c2c") for ms in settings["prefill_ms"][route].values()), settings
    assert [int(w) for w in settings["decode_step_ms"]] == settings["slot_widths"], settings
    assert all(ms > 0 for ms in settings["decode_step_ms"].values()), settings


def test_http_benchmark_sees_each_first_token_after_the_stand_in_engine_hands_it_out(tmp_path):
    run_script("bench_serve_http.py", out_dir=tmp_path)
    (row,) = [r for r in rows(tmp_path / "serve_http.jsonl") if "requests" in r]
    assert row["requests"] > 0 and row["failed"] == 0 and row["refused"] == 0, row
    # Per request the client's wait spans the engine's (sent before, seen after): so do their medians.
    assert 0 < row["engine_first_token_p50_ms"] <= row["ttft_p50_ms"], row
    assert row["chunks_per_token"] > 0, row
