"""The GPU benchmark scripts run end to end at tiny shapes on the CPU, so the commands that
docs/performance.md gives keep working, and the scaling script's numerical check holds."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name, *args, out_dir, devices=1):
    env = dict(os.environ, OUT=str(out_dir), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
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
    ("bench_inference.py", ("--skip-torch", "--only", "models,fusion,ttft,ttft_parts,generate"), "inference.jsonl"),
    ("bench_attention.py", (), "attention.jsonl"),
])
def test_benchmark_scripts_report_rows(tmp_path, script, args, output):
    run_script(script, *args, out_dir=tmp_path)
    header = rows(tmp_path / output)[0]
    assert "device" in header and re.fullmatch(r"[0-9a-f]{12}", header["library"]), header
    measured = [r for r in rows(tmp_path / output) if "bench" in r and r.get("what") != "settings"]
    assert measured
    for row in measured:
        if row.get("what", "").startswith("max_abs_error"):  # bench_attention's accuracy rows (bf16 against float32)
            assert all(0 <= row[k] < 0.05 for k in ("out", "dq", "dk", "dv")), row
            continue
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


def test_ttft_program_variants_agree(tmp_path):
    """bench/ttft_programs.py's variants of the C2C TTFT route (interleaved prefix passes, no padding
    mask, masked prefix passes, the last token's attention written into the cache first, XLA's
    attention for the last token, two or three programs, a donated output) compute what the library's route does."""
    variants = ("dispatch_floor,receiver_pass,receiver_pass_unmasked,sharer_pass,both_passes,both_passes_unmasked,"
                "both_passes_interleaved,c2c_ttft,c2c_ttft_unmasked,c2c_ttft_interleaved,c2c_ttft_two_programs,"
                "c2c_ttft_three_programs,c2c_ttft_two_programs_pair_suffix,c2c_ttft_small_first_program,"
                "c2c_ttft_small_first_pair_suffix,c2c_ttft_overlapped,c2c_ttft_small_first_overlapped,"
                "c2c_ttft_donated_output,c2c_ttft_two_programs_masked,c2c_ttft_two_programs_slice_write,"
                "c2c_ttft_two_programs_xla_attention,receiver_ttft,receiver_ttft_two_programs,"
                "receiver_ttft_two_programs_masked,receiver_ttft_two_programs_slice_write,"
                "receiver_ttft_two_programs_xla_attention")
    run_script("ttft_programs.py", "--rounds", "1", "--pipelined", "2", "--first-layers", "1", "--fuse-chunk", "2",
               "--variants", variants,
               out_dir=tmp_path)
    result = {r["what"]: r for r in rows(tmp_path / "ttft_programs.jsonl")[1:]}
    first = {k: tuple(v) for k, v in result["check_first_tokens"].items() if k.startswith("c2c_ttft")}
    assert len(first) == 14 and len(set(first.values())) == 1, first  # three prompts, fourteen routes
    # ... and with the same logit, up to bf16 rounding in the caches of interleaved or staged passes
    # (0.01 here; logits of the masked copy in the pair suffix, a wrong route, are 0.15 off).
    logits = {k: v for k, v in result["check_first_token_logits"].items() if k.startswith("c2c_ttft")}
    assert len(logits) == 14
    for name, values in logits.items():
        np.testing.assert_allclose(values, logits["c2c_ttft"], atol=0.03, err_msg=name)
    # Receiver-only in one program, in the library's two, with masked prefix passes, with the last
    # token's attention of session 10 and with XLA's for it: the same tokens and logits.
    for name in ("receiver_ttft_two_programs", "receiver_ttft_two_programs_masked",
                 "receiver_ttft_two_programs_slice_write", "receiver_ttft_two_programs_xla_attention"):
        assert result["check_first_tokens"][name] == result["check_first_tokens"]["receiver_ttft"]
        np.testing.assert_allclose(result["check_first_token_logits"][name],
                                   result["check_first_token_logits"]["receiver_ttft"], atol=1e-5)
    for check in ("check_both_passes_interleaved", "check_both_passes_unmasked"):
        assert result[check]["max_abs_diff_vs_both_passes"] < 0.05  # at most a bf16 rounding step
    for name in variants.split(","):
        assert result[name]["median_ms"] > 0 and len(result[name]["each_round_ms"]) == 1
        assert 0 < result[name]["dispatch_ms"] < result[name]["median_ms"] * 10
        assert name == "c2c_ttft_donated_output" or result[name]["pipelined_ms_per_call"] > 0


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
    ttft = summary["rows"]["bench=inference what=ttft tokens=32 batch=1"]
    assert all(len(ttft[field][side]) == 1 and ttft[field][side][0] > 0
               for field in ("c2c_ms", "receiver_only_ms") for side in ("base", "new"))


def test_gemv_ways_compute_the_same_layer_chain(tmp_path):
    """bench/bench_gemv.py's three one-row products (XLA two rows, XLA vector, a Pallas kernel in
    interpret mode, with K split over several programs) agree with a float32 chain up to bf16."""
    run_script("bench_gemv.py", out_dir=tmp_path)
    result = {r["what"]: r for r in rows(tmp_path / "bench_gemv.jsonl")[1:]}
    assert set(result) == {"xla_rows", "xla_vector", "pallas"}
    for row in result.values():
        assert row["products"] == 12 and row["us_per_product"] > 0
        assert row["max_abs_diff_vs_float32"] < 0.03 * row["reference_max_abs"]


def test_gemv_sweep_settings_compute_the_same_layer_chain(tmp_path):
    """bench/gemv_sweep.py: XLA's two-row GEMM (stacked and per-layer weights) and both Pallas
    kernel forms (in interpret mode) agree with a float32 chain up to bf16."""
    run_script("gemv_sweep.py", out_dir=tmp_path)
    result = {r["what"]: r for r in rows(tmp_path / "gemv_sweep.jsonl")[1:]}
    assert {"xla_rows_stacked", "xla_rows", "xla_rows_again"} <= set(result)
    assert any(w.startswith("single_") for w in result) and any(w.startswith("loop_") for w in result)
    for row in result.values():
        assert row["us_per_product"] > 0
        assert row["max_abs_diff"] < 0.03 * row["reference_max_abs"], row



def test_serving_benchmark_reports_both_routes(tmp_path):
    run_script("bench_serve.py", "--clients", "2", "--seconds", "1", "--processes", "1", out_dir=tmp_path)
    measured = [r for r in rows(tmp_path / "serve.jsonl") if r.get("model")]
    assert [(r["model"], r["clients"]) for r in measured] == [("receiver", 2), ("c2c", 2)]
    for row in measured:
        assert row["requests"] > 0 and row["failed"] == 0 and row["output_tokens_per_s"] > 0, row
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and 0 < row["itl_p50_ms"] <= row["itl_p99_ms"], row
