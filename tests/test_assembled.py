"""Model files assembled from chunk packages into the user cache (spectra/models/assembled.py): assembled once,
reused without re-hashing, re-hashed when changed, refused when corrupt, and one line when the package is missing.
A stand-in package (two chunks, the real package's assemble contract) keeps these tests instant; the real Gemma 3
package runs in tests/test_gemma3.py."""

from __future__ import annotations

import hashlib
import os
import sys

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


def test_assembled_once_then_reused_without_hashing(chunked, tmp_path, monkeypatch):
    path = assembled_file("chunked_model", "model.gguf")
    assert path == tmp_path / "cache" / "spectra" / "models" / "chunked_model" / "model.gguf"
    assert path.read_bytes() == CONTENT and len(chunked.calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf", "model.gguf.verified.json"]  # no .partial

    def no_hashing(_path):
        raise AssertionError("an unchanged, verified file was hashed again")

    monkeypatch.setattr(assembled, "sha256_file", no_hashing)
    assert assembled_file("chunked_model", "model.gguf") == path
    assert len(chunked.calls) == 1


def test_a_changed_file_is_hashed_again_and_a_corrupt_one_refused(chunked):
    path = assembled_file("chunked_model", "model.gguf")
    os.utime(path, ns=(0, 0))  # same content, another mtime: hashed again, still good, stamp renewed
    assert assembled_file("chunked_model", "model.gguf") == path
    corrupt = bytearray(CONTENT)
    corrupt[-1] ^= 1
    path.write_bytes(bytes(corrupt))  # same size
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
