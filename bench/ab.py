"""Same-card A/B: one benchmark command run alternately on two library trees, several rounds.

    mkdir ab_base && git archive HEAD~1 c2c_jax bench | tar -x -C ab_base
    python bench/ab.py --base ab_base --rounds 2 -- bench/bench_inference.py --only ttft --lengths 512 --batches 1

The tree this script sits in is side "new"; `--base` is another copy of `c2c_jax/` and `bench/`
(the GPU machine's copy of the working tree has no git history, so make it before the call), or this
tree again with `--new-xla-flags` to compare XLA flags instead of code:

    python bench/ab.py --base . --new-xla-flags=--xla_gpu_experimental_force_split_k=1 --rounds 2 -- \
        bench/bench_inference.py --skip-torch --only ttft --lengths 512 --batches 1

(A flag that changes GEMM autotuning needs its own `--xla_gpu_per_fusion_autotune_cache_dir` on
side new, if XLA_FLAGS names one: the later setting of a flag wins, and a shared cache would hand
that side the tiles tuned without the flag.)

Every
run is its own process, with its own compilation and autotuning, in the order base, new, base,
new, ...: the spread between compilations and any drift of the card then show in the table rather
than hiding inside one difference. Each run's result files go to $OUT/ab/<round>_<side>/ (OUT
defaults to "."); the table of every numeric field of every row, per side and round, is printed and
saved as $OUT/ab/summary.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import sys

NEW_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("bench", "what", "model", "tokens", "batch", "context")  # what identifies a row across runs


def side_env(root: str, out: str, xla_flags: str = "") -> dict:
    env = dict(os.environ, OUT=out)
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def check_imports(root: str) -> None:
    """Fails unless a process started like the runs imports c2c_jax from `root` (an installed copy,
    editable or not, can shadow PYTHONPATH)."""
    found = subprocess.run([sys.executable, "-c", "import c2c_jax; print(c2c_jax.__file__)"], cwd=root,
                           env=side_env(root, "."), capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.abspath(found).startswith(os.path.join(os.path.abspath(root), "")):
        raise SystemExit(f"a run in {root} would import c2c_jax from {found}; uninstall that copy "
                         "(pip uninstall c2c-jax) or run where it is not installed")


def read_rows(out: str) -> tuple[dict, list[dict]]:
    """(header of the first result file, all rows) of one run's result files."""
    header, rows = {}, []
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if lines:
            header = header or lines[0]
            rows += lines[1:]
    return header, rows


def summarise(runs: list[tuple[int, str, str, int | str]]) -> dict:
    """{row key: {field: {side: [value per round]}}} and each run's library digest and exit status."""
    table = collections.defaultdict(lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    libraries = {}
    for round_, side, out, returncode in runs:
        header, rows = read_rows(out)
        libraries[f"{round_}_{side}"] = dict(library=header.get("library"), xla_flags=header.get("xla_flags"),
                                             returncode=returncode)
        for row in rows:
            key = " ".join(f"{k}={row[k]}" for k in ROW_KEYS if k in row)
            for field, value in row.items():
                if field not in ROW_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    table[key][field][side].append(value)
    return {"runs": libraries, "rows": json.loads(json.dumps(table))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="directory holding the other tree's c2c_jax/ and bench/")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--new-xla-flags", default="", help="XLA flags added to side new's XLA_FLAGS")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [its arguments], relative to a tree")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    sides = {"base": os.path.abspath(args.base), "new": NEW_ROOT}
    for root in sides.values():
        if not os.path.isfile(os.path.join(root, command[0])):
            raise SystemExit(f"{command[0]} is not in {root}")
        check_imports(root)
    top = os.path.join(os.path.abspath(os.environ.get("OUT", ".")), "ab")
    runs = []
    for round_ in range(args.rounds):
        for side, root in sides.items():
            out = os.path.join(top, f"{round_}_{side}")
            os.makedirs(out, exist_ok=True)
            print(f"== round {round_}, {side}: {root}", flush=True)
            try:
                xla_flags = args.new_xla_flags if side == "new" else ""
                returncode = subprocess.run([sys.executable, *command], cwd=root, env=side_env(root, out, xla_flags),
                                            timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                returncode = "timeout"  # rows saved before the limit still count
            runs.append((round_, side, out, returncode))
    summary = summarise(runs)
    with open(os.path.join(top, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["runs"]))
    for key, fields in summary["rows"].items():
        for field, by_side in fields.items():
            print(f"{key} {field}: " + "  ".join(f"{side} {by_side.get(side, [])}" for side in sides))


if __name__ == "__main__":
    main()
