"""Model files that a Python package assembles from chunks (PyPI caps a file at ~100 MB) instead of holding.

The package's `assemble(path)` joins its chunk packages into one file; Spectra does that once, into the user's
cache (`$XDG_CACHE_HOME/spectra/models/<package>/`, else `~/.cache/...`), and reuses the file afterwards. The
file's content is checked against the package's `EXPECTED_SHA256` once in every process that uses it, not trusted
from its size and modification time: bit rot leaves both unchanged. Gemma 3's 253 MB hash in ~0.3 s (0.7 s on a
loaded 2-core machine), a small share of its load.

    python -m spectra.run model=gemma3_270m       # first run assembles gemma-3-270m-q4_k_m.gguf (~1 s)
"""

from __future__ import annotations

import errno
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


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256: each file hashed once per process


def _identity(target: Path) -> tuple:
    stat = target.stat()
    return str(target), stat.st_ino, stat.st_size, stat.st_mtime_ns


def sha256_once(target: Path) -> str:
    """target's sha256, hashed once per process (again if the file changed)."""
    identity = _identity(target)
    if identity not in _DIGESTS:
        _DIGESTS[identity] = sha256_file(target)
    return _DIGESTS[identity]


def verified(target: Path, expected_sha256: str) -> bool:
    """True when target's content hashes to expected_sha256."""
    return sha256_once(target) == expected_sha256


# A cache folder Spectra may not write: the fix is another cache folder, never "free space" or "delete it".
UNWRITABLE = {errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
CACHE_FIX = "set XDG_CACHE_HOME to a writable folder (the file goes to $XDG_CACHE_HOME/spectra/models/) and run again"


def cache_fault(folder: Path, file_name: str, error: OSError) -> SpectraError | None:
    """The one line for a write into the cache that failed for want of permission or space; None for other errors."""
    if error.errno in UNWRITABLE:
        return SpectraError(f"{folder}: cannot write {file_name} there ({UNWRITABLE[error.errno]}); {CACHE_FIX}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpectraError(f"{folder}: the disk is full, assembling {file_name}; free space there, or {CACHE_FIX}")
    return None


def assembled_file(package: str, file_name: str) -> Path:
    """The file `package` assembles, from the cache (assembled there first if absent); SpectraError if it cannot.
    A valid file is used as it is, with nothing written: a read-only cache that holds it works."""
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise SpectraError(f"package '{package}' is not importable ({error}); {install_hint(package)}") from None
    if not (hasattr(module, "assemble") and hasattr(module, "EXPECTED_SHA256")):
        raise SpectraError(f"package '{package}' has no assemble() and EXPECTED_SHA256; it cannot assemble {file_name}")
    expected = module.EXPECTED_SHA256

    target = cache_dir() / package / file_name
    if target.exists():
        try:
            if verified(target, expected):
                return target
        except OSError as error:  # unreadable: another user's cache, or a damaged disk
            raise SpectraError(f"{target}: cannot be read ({error.strerror or error}); {CACHE_FIX}") from None
        corrupt = f"{target} is corrupt (its sha256 is not {expected[:16]}...)"
        if not os.access(target.parent, os.W_OK):  # a read-only mount: EROFS even for root
            raise SpectraError(f"{corrupt} and {target.parent} is not writable, so it cannot be re-assembled there; "
                               f"{CACHE_FIX}")  # fmt: skip
        raise SpectraError(f"{corrupt}; delete it and run again to re-assemble it from '{package}'")

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name (not ending in the file's suffix), renamed when complete: concurrent runs each
        # assemble whole files, and a killed one leaves no half-written file under the real name.
        handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{file_name}.", suffix=".partial")
    except OSError as error:
        raise (cache_fault(target.parent, file_name, error) or error) from None
    # mkstemp makes the file 0600: a cache assembled once and shared read-only with other users must be readable.
    os.fchmod(handle, 0o644)
    os.close(handle)
    try:
        module.assemble(partial, overwrite=True)  # checks the sha256 itself
        with open(partial, "rb") as written:
            os.fsync(written.fileno())  # on disk before it has the real name: a power cut leaves no empty file there
        os.replace(partial, target)
    except OSError as error:
        raise (cache_fault(target.parent, file_name, error) or _cannot_assemble(file_name, package, error)) from None
    except ValueError as error:
        raise _cannot_assemble(file_name, package, error) from None
    finally:
        Path(partial).unlink(missing_ok=True)
    _DIGESTS[_identity(target)] = expected  # assemble() checked the sha256 of what it wrote
    return target


def install_hint(package: str) -> str:
    return f"run scripts/setup.sh, or pip install {package.replace('_', '-')}"


def _cannot_assemble(file_name: str, package: str, error: Exception) -> SpectraError:
    return SpectraError(f"cannot assemble {file_name} from '{package}': {error}; reinstall it "
                        f"({install_hint(package)})")  # fmt: skip
