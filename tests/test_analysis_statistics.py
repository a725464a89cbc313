"""The analysis' window-aware ratios, position-controlled statistics and token text, each against an independent
reference: transformers' own config fields and the capture's sink_attn for the windows; numpy least squares,
scipy's t-test and an explicit resampling loop for the statistics; the tokenizer itself for token text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import transformers
from conftest import run_spectra
from scipy import stats
from test_analyze import analyze_cli

from spectra.analysis import controlled, head_stats
from spectra.analysis.exports import open_views
from spectra.analysis.tokens import run_tokenizer, token_context
from spectra.models.windows import attention_windows

WINDOW, T = 16, 64
KEYS = ("sample_id", "layer", "head", "token_pos", "k_eff")


def read_rows(run: Path) -> dict[str, np.ndarray]:
    """Every row of a run, read with pyarrow (not polars): keys and k_eff as int64, metrics as float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(part) for part in sorted((run / "metrics").glob("part-*.parquet")))
    return {name: table[name].to_numpy().astype(np.int64 if name in KEYS else np.float64) for name in table.column_names}


def test_attention_windows_from_each_config_style():
    common = dict(num_hidden_layers=4, vocab_size=64, hidden_size=16, num_attention_heads=2)
    assert attention_windows(transformers.LlamaConfig(**common)) == [None] * 4
    assert attention_windows(transformers.MistralConfig(**common, sliding_window=8)) == [8] * 4  # every layer
    assert attention_windows(transformers.MistralConfig(**common, sliding_window=None)) == [None] * 4
    qwen2 = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert attention_windows(qwen2) == [None, 8, 8, 8]
    assert attention_windows(transformers.Qwen2Config(**common, sliding_window=8)) == [None] * 4  # switched off
    assert attention_windows(transformers.Gemma2Config(**common, sliding_window=8)) == [8, None, 8, None]
    gemma3 = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 7}, sliding_window=8)
    assert attention_windows(gemma3) == [8] * 5 + [None, 8]
    chunked = transformers.Gemma2Config(**common, sliding_window=8)
    chunked.layer_types = ["chunked_attention", "full_attention", "sliding_attention", "full_attention"]
    assert attention_windows(chunked) == ["chunked_attention", None, 8, None]


@pytest.fixture(scope="module")
def gemma2_run(tmp_path_factory) -> Path:
    """tiny_gemma2 (layer 0 slides over 16 keys, layer 1 full), 3 samples x 64 tokens, analysed."""
    tmp = tmp_path_factory.mktemp("gemma2")
    result = run_spectra(tmp, "model=tiny_gemma2", "data=synthetic", f"data.context_length={T}", "data.n_samples=3",
                         "metrics=extended", "logger=none")  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = analyze_cli(tmp, f"run_dir={tmp / 'run'}", "bootstrap=50", "figures=false")  # tables only
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def test_window_aware_ratios_on_a_sliding_layer(gemma2_run):
    record = json.loads((gemma2_run / "run.json").read_text())
    assert record["model"]["attention_windows"] == [WINDOW, None]
    rows = read_rows(gemma2_run)
    layer, t = rows["layer"], rows["token_pos"]
    # The window's meaning, from the capture's own numbers: on layer 0 position 0 is visible up to t = 15 and
    # gone from t = 16, so query t sees the 16 keys t - 15..t.
    assert (rows["sink_attn"][(layer == 0) & (t == WINDOW - 1)] > 0).all()
    assert (rows["sink_attn"][(layer == 0) & (t >= WINDOW)] == 0).all()
    assert rows["k_eff"][layer == 0].max() <= WINDOW

    visible = np.where(layer == 0, np.minimum(t + 1, WINDOW), t + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy_normalized = np.where(visible > 1, rows["entropy"] / np.log(visible), np.nan)
        k_eff_fraction = np.where(visible > 1, rows["k_eff"] / visible, np.nan)
    profile = pl.read_parquet(gemma2_run / "analysis" / "positions.parquet")
    for row in profile.iter_rows(named=True):
        mask = (layer == row["layer"]) & (t == row["token_pos"])
        if row["token_pos"] == 0:  # one key: no ratio, and a null, not a NaN that would poison every mean
            assert row["entropy_normalized"] is None and row["k_eff_fraction"] is None
            continue
        np.testing.assert_allclose(row["entropy_normalized"], entropy_normalized[mask].mean(), rtol=1e-12)
        np.testing.assert_allclose(row["k_eff_fraction"], k_eff_fraction[mask].mean(), rtol=1e-12)
    # Random weights attend almost uniformly: over the 16 visible keys at t = 63, k_eff = ceil(0.9 * 16) = 15.
    last = profile.filter(pl.col("token_pos") == T - 1).sort("layer")
    assert last["k_eff_fraction"][0] == pytest.approx(15 / 16, abs=0.01)  # not 15 / 64 = 0.234
    assert last["entropy_normalized"][0] == pytest.approx(1.0, abs=0.01)  # not ln 16 / ln 64 = 0.667
    assert last["k_eff_fraction"][1] == pytest.approx(58 / 64, abs=0.02)  # the full layer: ceil(0.9 * 64) / 64

    heads = pl.read_parquet(gemma2_run / "analysis" / "heads.parquet")
    assert heads["entropy_normalized_mean"].is_finite().all()
    # DuckDB's view computes the same ratios (its SQL is written separately from the polars expression).
    connection = open_views(gemma2_run / "analysis")
    sql = "SELECT avg(k_eff_fraction), avg(entropy_normalized), count(entropy_normalized) FROM metrics WHERE layer = 0"
    fraction, normalized, count = connection.execute(sql).fetchone()
    np.testing.assert_allclose([fraction, normalized], [np.nanmean(k_eff_fraction[layer == 0]),
                                                        np.nanmean(entropy_normalized[layer == 0])], rtol=1e-9)  # fmt: skip
    assert count == 3 * 8 * (T - 1)


def partial_reference(x: np.ndarray, y: np.ndarray, sample: np.ndarray, position: np.ndarray) -> tuple:
    """Ranks, both regressed on one indicator per position (least squares), residuals correlated; the t-test
    of per-sample sums of residual products. Rows in any order."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    design = (position[:, None] == np.unique(position)[None, :]).astype(float)  # (n, positions) one-hot
    residual_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    residual_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    r = np.corrcoef(residual_x, residual_y)[0, 1]
    per_sample = [np.sum((residual_x * residual_y)[sample == s]) for s in np.unique(sample)]
    return r, stats.ttest_1samp(per_sample, 0.0).pvalue, rx, ry


def bootstrap_reference(rx, ry, sample, position, draws: int, seed: int) -> np.ndarray:
    """Percentile interval by literally building each resample: whole samples drawn with replacement."""
    return np.nanpercentile(bootstrap_draws(rx, ry, sample, position, draws, seed), [2.5, 97.5])


def bootstrap_draws(rx, ry, sample, position, draws: int, seed: int) -> np.ndarray:
    """The partial r of each resample, built literally: whole samples drawn with replacement."""
    ids = np.unique(sample)
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))  # as resample_counts
    values = []
    for pick in picks:
        chosen = np.concatenate([np.flatnonzero(sample == ids[i]) for i in pick])
        px, py, pp = rx[chosen], ry[chosen], position[chosen]
        centred = [v - np.array([v[pp == q].mean() for q in pp]) for v in (px, py)]
        with np.errstate(divide="ignore", invalid="ignore"):  # both picks one sample: nothing varies, r undefined
            values.append(np.sum(centred[0] * centred[1]) / np.sqrt(np.sum(centred[0] ** 2) * np.sum(centred[1] ** 2)))
    return np.array(values)


def test_position_controlled_correlations_match_numpy(gemma2_run):
    rows = read_rows(gemma2_run)
    lf = pl.scan_parquet(gemma2_run / "metrics" / "part-*.parquet").filter(pl.col("layer") == 1)
    metrics = head_stats.metric_columns(lf)
    table = controlled.position_controlled(lf, metrics, skip_positions=2, draws=40, seed=3)
    assert table.height == 8 * (len(metrics) - 1) and set(table["samples"]) == {3}
    for row in table.filter(pl.col("y").is_in(["entropy", "max_attn"])).iter_rows(named=True):
        mask = (rows["layer"] == 1) & (rows["head"] == row["head"]) & (rows["token_pos"] >= 2)
        sample, position = rows["sample_id"][mask], rows["token_pos"][mask]
        r, p, rx, ry = partial_reference(rows["query_norm"][mask], rows[row["y"]][mask], sample, position)
        np.testing.assert_allclose(row["partial_r"], r, rtol=1e-9)
        np.testing.assert_allclose(row["partial_p"], p, rtol=1e-9)
        low, high = bootstrap_reference(rx, ry, sample, position, draws=40, seed=3)
        np.testing.assert_allclose([row["partial_ci_low"], row["partial_ci_high"]], [low, high], rtol=1e-9)


def synthetic_rows(samples: int, positions: int, coupling: float, seed: int = 0) -> pl.LazyFrame:
    """query_norm and entropy that both rise with position; coupled within a position only through `coupling`."""
    rng = np.random.default_rng(seed)
    sample, position = np.meshgrid(np.arange(samples), np.arange(positions), indexing="ij")
    shared = rng.normal(size=sample.shape)
    x = position + 5 * shared
    y = np.log1p(position) * 10 + 5 * (coupling * shared + np.sqrt(1 - coupling**2) * rng.normal(size=sample.shape))
    return pl.LazyFrame({"sample_id": sample.ravel(), "layer": 0, "head": 0, "token_pos": position.ravel(),
                         "query_norm": x.ravel(), "entropy": y.ravel()})  # fmt: skip


def test_position_confound_is_removed_and_a_real_association_kept():
    confounded = synthetic_rows(samples=8, positions=200, coupling=0.0)
    row = controlled.position_controlled(confounded, ["query_norm", "entropy"], 0, 200, 0).row(0, named=True)
    plain = head_stats.head_correlations(confounded, 0).row(0, named=True)
    assert plain["spearman_r"] > 0.8  # token-level: "query norm predicts entropy", only through position
    assert abs(row["partial_r"]) < 0.1 and row["partial_ci_low"] < 0 < row["partial_ci_high"] and row["partial_p"] > 0.01

    coupled = synthetic_rows(samples=8, positions=200, coupling=0.6)
    row = controlled.position_controlled(coupled, ["query_norm", "entropy"], 0, 200, 0).row(0, named=True)
    assert 0.45 < row["partial_r"] < 0.7 and row["partial_ci_low"] > 0.3 and row["partial_p"] < 1e-3

    one_sample = synthetic_rows(samples=1, positions=50, coupling=0.6)
    row = controlled.position_controlled(one_sample, ["query_norm", "entropy"], 0, 50, 0).row(0, named=True)
    assert np.isnan(row["partial_r"]) and np.isnan(row["partial_p"])  # one sample: nothing left within a position
    two_samples = synthetic_rows(samples=2, positions=50, coupling=0.6)
    row = controlled.position_controlled(two_samples, ["query_norm", "entropy"], 0, 50, 0).row(0, named=True)
    assert np.isfinite(row["partial_r"]) and np.isnan(row["partial_p"])  # r, but no test across two samples


def test_headline_and_undefined_heads_against_numpy():
    """The run's headline: heads with q < 0.05 by sign, and the median partial r over heads with its interval,
    against the per-head least-squares reference, scipy's BH and a literal resampling loop; a head with constant
    entropy and one with a NaN query norm are left out, each with its reason."""
    samples, positions, draws, seed = 6, 40, 40, 3
    heads = [synthetic_rows(samples, positions, coupling, seed=i).with_columns(head=pl.lit(i))
             for i, coupling in enumerate([0.8, 0.5, -0.6, 0.0, 0.3])]  # fmt: skip
    constant = synthetic_rows(samples, positions, 0.5).with_columns(head=pl.lit(5), entropy=pl.lit(2.0))
    broken = synthetic_rows(samples, positions, 0.5).with_columns(
        head=pl.lit(6), query_norm=pl.when(pl.col("token_pos") == 7).then(float("nan")).otherwise(pl.col("query_norm"))
    )  # fmt: skip
    lf = pl.concat([*heads, constant, broken]).with_columns(pl.col("head").cast(pl.Int64))
    table = controlled.with_q_values(controlled.position_controlled(lf, ["query_norm", "entropy"], 0, draws, seed))
    [row] = controlled.headline(table).iter_rows(named=True)

    notes = dict(zip(table["head"], table["partial_note"]))
    assert notes[5] == "entropy = 2 at every token" and notes[6] == "query_norm has non-finite values"
    assert all(notes[h] is None for h in range(5))
    rows = lf.collect()
    r, p, boots = [], [], []
    for head in range(5):
        part = rows.filter(pl.col("head") == head)
        sample, position = part["sample_id"].to_numpy(), part["token_pos"].to_numpy()
        r_head, p_head, rx, ry = partial_reference(part["query_norm"].to_numpy(), part["entropy"].to_numpy(), sample, position)
        r.append(r_head)
        p.append(p_head)
        boots.append(bootstrap_draws(rx, ry, sample, position, draws, seed))
    r, q = np.array(r), stats.false_discovery_control(p, method="bh")
    assert (row["heads"], row["tested"], row["with_r"], row["samples"]) == (7, 5, 5, samples)
    assert row["positive"] == int(((q < 0.05) & (r > 0)).sum()) and row["negative"] == int(((q < 0.05) & (r < 0)).sum())
    assert row["positive"] >= 2 and row["negative"] == 1  # the couplings 0.8, 0.5 and -0.6 are found
    np.testing.assert_allclose(row["median_r"], np.median(r), rtol=1e-9)
    medians = np.nanmedian(np.array(boots), axis=0)  # (draws,): the median over heads of each resample
    np.testing.assert_allclose([row["median_ci_low"], row["median_ci_high"]], np.nanpercentile(medians, [2.5, 97.5]),
                               rtol=1e-9)  # fmt: skip


def test_q_values_are_benjamini_hochberg():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2, 0.001, 0.04])
    finite = p[np.isfinite(p)]
    order = np.argsort(finite)
    m = len(finite)
    stepped = finite[order] * m / np.arange(1, m + 1)
    expected_sorted = np.minimum.accumulate(stepped[::-1])[::-1].clip(max=1)  # textbook step-up
    expected = np.empty(m)
    expected[order] = expected_sorted
    q = controlled.q_values(p)
    assert np.isnan(q[2])
    np.testing.assert_allclose(q[np.isfinite(p)], expected, rtol=1e-12)

    table = pl.DataFrame({"y": ["a", "a", "b", "b"], "partial_p": [0.01, 0.02, 0.5, 0.01]})
    assert controlled.with_q_values(table)["partial_q"].to_list() == pytest.approx([0.02, 0.02, 0.5, 0.02])


def test_token_text_and_top_tokens(gemma2_run):
    out = gemma2_run / "analysis"
    record = json.loads((gemma2_run / "run.json").read_text())
    tokenizer, why = run_tokenizer(record)
    assert tokenizer is not None, why
    samples = pl.read_parquet(gemma2_run / "samples.parquet")
    tokens = pl.read_parquet(out / "tokens.parquet")
    assert tokens.height == 3 * T
    ids = samples["input_ids"][1].to_list()
    row = tokens.filter(sample_id=1, token_pos=10).row(0, named=True)
    assert row["token_id"] == ids[10] and row["token"] == tokenizer.decode([ids[10]]).replace("\n", "\\n")
    assert token_context(tokens, 1, 10) == row["context"] and f"⟦{row['token']}⟧" in row["context"]

    rows = read_rows(gemma2_run)
    top = pl.read_parquet(out / "top_tokens.parquet")
    assert set(top["highlight"]) == {"highest query norm", "lowest normalized entropy",
                                     "highest sink mass (attention on position 0)"}  # fmt: skip
    for layer in (0, 1):
        mask = (rows["layer"] == layer) & (rows["token_pos"] >= 2)
        keys = rows["sample_id"][mask] * T + rows["token_pos"][mask]
        means = np.bincount(keys, rows["query_norm"][mask], minlength=3 * T) / 8  # over the layer's 8 heads
        grid = means.reshape(3, T)[:, 2:]  # (samples, positions t >= 2)
        # Ranked against the position: distance from the mean of the 3 samples there, in their standard deviations.
        deviation = (grid - grid.mean(axis=0)) / grid.std(axis=0, ddof=1)
        best = np.argsort(-deviation.ravel())[:3]
        got = top.filter(highlight="highest query norm", layer=layer).sort("rank")
        samples, positions = np.unravel_index(best, grid.shape)
        assert got["sample_id"].to_list() == samples.tolist() and got["token_pos"].to_list() == (positions + 2).tolist()
        np.testing.assert_allclose(got["value"].to_numpy(), grid.ravel()[best], rtol=1e-9)
        np.testing.assert_allclose(got["position_mean"].to_numpy(), grid.mean(axis=0)[positions], rtol=1e-9)
        np.testing.assert_allclose(got["deviation"].to_numpy(), deviation.ravel()[best], rtol=1e-9)
        assert got["token"].to_list() == [tokens.filter(sample_id=i, token_pos=t + 2)["token"][0]
                                          for i, t in zip(samples, positions)]  # fmt: skip
    report = (out / "report.md").read_text()
    assert "highest query norm" in report and f"`{top['token'][0]}`".replace("|", "\\|") in report
    assert "sliding window of W = 16 keys" in report and "partial_q" in report


def test_token_text_is_skipped_with_a_reason_when_the_tokenizer_cannot_load():
    record = {"config": {"model": {"source": "hub", "path": None, "package": None, "name_or_path": "no/such-model",
                                   "tokenizer": None, "revision": None, "trust_remote_code": False,
                                   "gguf_file": None}}}  # fmt: skip
    tokenizer, why = run_tokenizer(record)
    assert tokenizer is None and "no/such-model" in why
    assert run_tokenizer({}) == (None, "no run.json (the capture did not finish), so the tokenizer is unknown")
