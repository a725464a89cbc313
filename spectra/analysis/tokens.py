"""Token text for metric rows: which token a (sample_id, token_pos) is, its neighbours, and per layer the tokens
that stand out (highest query norm, lowest normalized entropy, highest sink mass).

samples.parquet holds token ids only; the run's own tokenizer (named by run.json's model config, loaded as the
capture loaded it) turns them into text. tokens.parquet has one row per (sample_id, token_pos): token_id, token
(the piece's text) and context (a few pieces either side, the token itself in ⟦ ⟧), ready to join with the
metric rows:

    python -m spectra.sql <run> "SELECT m.layer, m.head, t.context, m.entropy FROM metrics m
                                 JOIN tokens t USING (run, sample_id, token_pos) WHERE m.sample_id = 0 LIMIT 5"
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
from omegaconf import OmegaConf

from spectra.analysis.head_stats import with_ratios
from spectra.errors import SpectraError
from spectra.store.writer import write_parquet_atomic

CONTEXT = 4  # pieces shown on each side of a token
# (column, label, largest first?) of what the report ranks per layer, each against its position's mean.
HIGHLIGHTS = (
    ("query_norm", "highest query norm", True),
    ("entropy_normalized", "lowest normalized entropy", False),
    ("sink_attn", "highest sink mass (attention on position 0)", True),
)
TOKEN_SCHEMA = {"sample_id": pl.Int32, "token_pos": pl.Int32, "token_id": pl.Int32, "token": pl.String,
                "context": pl.String}  # fmt: skip


def run_tokenizer(record: dict):
    """(the run's tokenizer, "") or (None, why not): a hub model offline, a run without run.json."""
    from spectra.models.loading import load_tokenizer, model_location  # torch + transformers: only when needed

    model = record.get("config", {}).get("model")
    if not model:
        return None, "no run.json (the capture did not finish), so the tokenizer is unknown"
    model_cfg = OmegaConf.create(model)
    try:
        location = None if model_cfg.source == "random" else model_location(model_cfg)
        return load_tokenizer(model_cfg, location), ""
    except (SpectraError, OSError, ValueError) as error:
        return None, f"the run's tokenizer did not load ({str(error).splitlines()[0]})"


def visible_text(piece: str) -> str:
    """Whitespace a reader must see: a newline as \\n, a tab as \\t."""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def tokens_table(samples: pl.DataFrame, tokenizer, context: int = CONTEXT) -> pl.DataFrame:
    """samples: samples.parquet (sample_id, input_ids). One row per token, as TOKEN_SCHEMA."""
    vocabulary = np.unique(np.concatenate([np.asarray(ids) for ids in samples["input_ids"].to_list()]))
    # Each id decoded once; a context is its pieces laid end to end (a character split over two byte-level
    # pieces shows as U+FFFD, which a display can live with).
    texts = tokenizer.batch_decode([[i] for i in vocabulary], clean_up_tokenization_spaces=False)
    pieces = dict(zip(vocabulary.tolist(), map(visible_text, texts)))
    columns: dict[str, list] = {name: [] for name in TOKEN_SCHEMA}
    for sample_id, ids in zip(samples["sample_id"].to_list(), samples["input_ids"].to_list()):
        text = [pieces[i] for i in ids]
        for t, token_id in enumerate(ids):
            columns["sample_id"].append(sample_id)
            columns["token_pos"].append(t)
            columns["token_id"].append(token_id)
            columns["token"].append(text[t])
            left, right = "".join(text[max(t - context, 0) : t]), "".join(text[t + 1 : t + 1 + context])
            columns["context"].append(f"{left}⟦{text[t]}⟧{right}")
    return pl.DataFrame(columns, schema=TOKEN_SCHEMA)


def token_context(tokens: pl.DataFrame, sample_id: int, token_pos: int) -> str:
    """The context string of one metric row."""
    row = tokens.filter((pl.col("sample_id") == sample_id) & (pl.col("token_pos") == token_pos))
    if row.height != 1:
        raise SpectraError(f"no token at sample_id={sample_id}, token_pos={token_pos} in this run")
    return row["context"][0]


def top_tokens(
    lf: pl.LazyFrame, tokens: pl.DataFrame, windows: Sequence | None, skip_positions: int, top: int
) -> pl.DataFrame:
    """Per layer and highlight: the `top` (sample, position) rows whose value, averaged over the layer's heads,
    lies furthest from the mean of all samples at the same position, in standard deviations of the samples at
    that position (in the highlight's direction; 2 samples or more needed), positions
    t < skip_positions left out as the correlations leave them out. Ranked against the position, as the
    position-controlled statistics are: raw values would fill the table with early positions, where a query sees
    a handful of keys. Long table: layer, highlight, rank, sample_id, token_pos, value, position_mean, deviation
    (the standard deviations), token, context."""
    lf = with_ratios(lf, windows)
    present = [h for h in HIGHLIGHTS if h[0] in lf.collect_schema()]
    if not present:
        return pl.DataFrame()
    means = (
        lf.filter(pl.col("token_pos") >= skip_positions)
        .group_by("layer", "sample_id", "token_pos")
        .agg(pl.col(name).mean() for name, _, _ in present)
        .collect(engine="streaming")
    )
    tables = []
    for name, label, largest in present:
        ranked = (
            means.drop_nulls(name)
            .with_columns(pl.col(name).mean().over("layer", "token_pos").alias("position_mean"))
            # In standard deviations of the position's spread: early positions vary more from sample to sample,
            # and a raw difference would let them fill the table again.
            .with_columns(((pl.col(name) - pl.col("position_mean")) / pl.col(name).std().over("layer", "token_pos"))
                          .fill_nan(None).alias("deviation"))  # fmt: skip
            .drop_nulls("deviation")
            .sort("deviation", descending=largest)
            .group_by("layer", maintain_order=True)
            .head(top)
            .with_columns(
                pl.col(name).alias("value"),
                pl.lit(label).alias("highlight"),
                pl.int_range(pl.len()).over("layer").add(1).alias("rank"),
            )
            .select("layer", "highlight", "rank", "sample_id", "token_pos", "value", "position_mean", "deviation")
            .sort("layer", "rank")
        )
        tables.append(ranked)
    keys = ("sample_id", "token_pos")
    table = pl.concat(tables).with_columns(pl.col(keys).cast(pl.Int32))
    return table.join(tokens.select(*keys, "token", "context"), on=keys, how="left", maintain_order="left")


def write_tokens(samples_path: Path, tokenizer, path: Path) -> pl.DataFrame:
    table = tokens_table(pl.read_parquet(samples_path, glob=False), tokenizer)
    write_parquet_atomic(table.to_arrow(), path)
    return table
