"""analysis/explorer.html: its embedded data against the Parquet files and numpy, its bounds, and the page itself
in headless Chromium (tests/browser.py): no console error, no network, and a click on a head and a choice of
metric colour the tokens with that head's values from the metric parts.

    python -m pytest tests/test_explorer.py
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import Browser, chromium
from conftest import run_spectra_inprocess
from hydra import compose, initialize_config_dir

from spectra.analysis import explorer
from spectra.analysis.runs import run_record, scan_metrics
from spectra.analyze import analyze
from spectra.config.paths import config_dir

NO_BROWSER = "no chromium on PATH: bash scripts/setup.sh installs Debian's package (needs root and apt-get)"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """tiny_gemma2 (layer 0: a 16-key sliding window), two extended metrics, 3 samples x 32 tokens, analysed."""
    folder = tmp_path_factory.mktemp("explorer") / "run"
    code, _, stderr = run_spectra_inprocess("model=tiny_gemma2", "data=synthetic", "data.context_length=32",
                                            "data.n_samples=3", "metrics.names=[query_norm,entropy,max_attn,k_eff,sink_attn,lse]",
                                            "logger=none", f"hydra.run.dir={folder}")  # fmt: skip
    assert code == 0, stderr
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        overrides = [f"run_dir={folder}", "bootstrap=50", "logger=none", "figures=false"]
        analyze(compose(config_name="analyze", overrides=overrides))
    return folder


@pytest.fixture(scope="module")
def rows(run) -> dict[str, np.ndarray]:
    """Every metric row, read with pyarrow, and the ratios computed here with numpy from run.json's windows."""
    table = pa.concat_tables(pq.read_table(part) for part in sorted((run / "metrics").glob("part-*.parquet")))
    rows = {name: table[name].to_numpy() for name in table.column_names}
    windows = json.loads((run / "run.json").read_text())["model"]["attention_windows"]
    assert windows[0] == 16 and windows[1] is None  # the window must matter for the ratios checked below
    window = np.array([w or np.iinfo(np.int64).max for w in windows])[rows["layer"]]
    visible = np.minimum(rows["token_pos"].astype(np.int64) + 1, window)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["entropy_normalized"] = np.where(visible > 1, rows["entropy"] / np.log(visible), np.nan)
        rows["k_eff_fraction"] = np.where(visible > 1, rows["k_eff"] / visible, np.nan)
    return rows


def head_values(rows: dict, metric: str, sample: int, layer: int, head: int) -> np.ndarray:
    chosen = (rows["sample_id"] == sample) & (rows["layer"] == layer) & (rows["head"] == head)
    order = np.argsort(rows["token_pos"][chosen])
    return rows[metric][chosen][order].astype(np.float64)


def embedded(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4")


def test_page_data_matches_the_parquet_files(run, rows):
    page = (run / "analysis" / "explorer.html").read_text(encoding="utf-8")
    data = embedded(page)
    size = (run / "analysis" / "explorer.html").stat().st_size
    assert f"This file: {explorer.size_text(size)} ({size:,} bytes)" in page  # the size it states is its own
    assert data["samples"] == [0, 1, 2] and data["positions"] == 32 and data["layers"] == [0, 1] and data["heads"] == 8
    assert data["metrics"] == ["query_norm", "entropy", "max_attn", "k_eff", "sink_attn", "lse", "entropy_normalized",
                               "k_eff_fraction"]  # fmt: skip
    # Token rows, indexed ((sample, layer, head), position): exactly the Parquet float32 values.
    for metric in ("query_norm", "entropy", "k_eff", "sink_attn", "entropy_normalized"):
        grid = floats(data["values"][metric]).reshape(3, 2, 8, 32)
        for sample, layer, head in ((0, 0, 0), (2, 1, 7), (1, 0, 5)):
            expected = head_values(rows, metric, sample, layer, head).astype(np.float32)
            np.testing.assert_array_equal(grid[sample, layer, head], expected, err_msg=f"{metric} {sample} {layer} {head}")
    # Residual ranks over all samples: their Pearson r over a head's rows is correlations.parquet's partial_r.
    correlations = pl.read_parquet(run / "analysis" / "correlations.parquet").filter(pl.col("y") == "entropy")
    residuals = explorer.residual_ranks(scan_metrics(run), 2).collect()
    for layer, head, partial_r in correlations.select("layer", "head", "partial_r").iter_rows():
        pair = residuals.filter(layer=layer, head=head)
        assert pair.height == 3 * 30
        r = np.corrcoef(pair["query_norm_residual"], pair["entropy_residual"])[0, 1]
        assert r == pytest.approx(partial_r, abs=1e-9)
    x = floats(data["values"]["query_norm_residual"]).reshape(3, 2, 8, 32)
    assert np.isnan(x[:, :, :, :2]).all() and np.isfinite(x[:, :, :, 2:]).all()  # t < skip_positions: none
    # Profiles: each head's mean over all samples, per position (32 positions: one bin each).
    profile = floats(data["profiles"]["entropy_normalized"]).reshape(2, 8, 32)
    expected = np.mean([head_values(rows, "entropy_normalized", s, 0, 3)[1:] for s in range(3)], axis=0)
    np.testing.assert_allclose(profile[0, 3, 1:], expected, rtol=1e-6)
    assert np.isnan(profile[0, 3, 0])  # t = 0: one key, no ratio
    # The per-head table: heads.parquet's means and correlations.parquet's partial r and q, one row a head.
    table = data["table"]
    heads = pl.read_parquet(run / "analysis" / "heads.parquet").sort("layer", "head")
    assert table["entropy_mean"] == heads["entropy_mean"].to_list()
    assert table["partial_r_entropy"] == correlations.sort("layer", "head")["partial_r"].to_list()
    assert list(table)[2:6] == ["partial_r_entropy", "partial_ci_low_entropy", "partial_ci_high_entropy", "partial_q_entropy"]
    assert set(explorer.tables(run / "analysis")) == {"explorer_heads", "top_tokens"}


def test_token_rows_stay_within_the_budget(run, monkeypatch, tmp_path):
    assert explorer.shown_window(8, 512, 30 * 9 * 8, 2_500_000) == (2, 512)  # the default run: 2 whole samples
    assert explorer.shown_window(64, 8192, 32 * 32 * 8, 2_500_000) == (1, 305)  # Llama-3-8B: part of one
    assert explorer.shown_window(3, 32, 16, 10**9) == (3, 32)
    columns = len(embedded((run / "analysis" / "explorer.html").read_text(encoding="utf-8"))["values"])
    monkeypatch.setattr(explorer, "TOKEN_VALUES", 2 * 8 * columns * 20)  # 20 positions of one sample
    out = tmp_path / "analysis"
    out.mkdir()
    for name in ("heads", "correlations", "tokens", "top_tokens"):
        (out / f"{name}.parquet").symlink_to(run / "analysis" / f"{name}.parquet")
    path = explorer.write_explorer(run, out, scan_metrics(run), run_record(run), "bounded", 2)
    data = embedded(path.read_text(encoding="utf-8"))
    assert data["samples"] == [0] and data["positions"] == 20 and len(data["tokens"][0]) == 20
    assert all(floats(values).size == 2 * 8 * 20 for values in data["values"].values())
    assert "samples 0 of 3, positions 0-19 of 32: 320 of 1,536 rows" in data["bounds"]


def test_token_text_cannot_break_out_of_the_page():
    data = {"tokens": [["</script>", "<!--<script>", "{{SIZE}}", "/*DATA*/", "\u2028"]], "n": None}
    page = explorer.render(data)
    assert embedded(page) == data
    template = explorer.page_template()
    assert page.count("</script>") == template.count("</script>")  # only the page's own elements end
    assert "This file: {{SIZE}}" not in page and page.count("{{SIZE}}") == 1  # the header's filled, the token kept


def cell_centre(page, layer: int, head: int) -> tuple[float, float]:
    """Where the heatmap draws (layer, head), in the page's pixels (plotly's axis mapping)."""
    return tuple(page.evaluate(f"""(() => {{
        const plot = document.getElementById("heatmap"), size = plot._fullLayout._size, box = plot.getBoundingClientRect();
        return [box.left + size.l + plot._fullLayout.xaxis.l2p({head}), box.top + size.t + plot._fullLayout.yaxis.l2p({layer})];
    }})()"""))  # fmt: skip


def choose(page, menu: str, value: str) -> None:
    page.evaluate(f'(() => {{ const m = document.getElementById("{menu}"); m.value = "{value}"; '
                  f'm.dispatchEvent(new Event("change")); }})()')  # fmt: skip


def shown_tokens(page) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, values from data-value, background colours) of the coloured tokens."""
    spans = page.evaluate('[...document.querySelectorAll("#tokens span")].map((s) => [s.textContent, s.dataset.value, '
                          's.style.background])')  # fmt: skip
    values = np.array([np.nan if v == "undefined" else float(v) for _, v, _ in spans])
    return [t for t, _, _ in spans], values, [c for _, _, c in spans]


@pytest.mark.skipif(chromium() is None, reason=NO_BROWSER)
def test_the_page_in_headless_chromium(run, rows, tmp_path):
    path = run / "analysis" / "explorer.html"
    tokens = pl.read_parquet(run / "analysis" / "tokens.parquet")
    with Browser() as browser:
        page = browser.open(path)
        page.wait_until("document.body.dataset.ready === 'true'")

        page.click(*cell_centre(page, 1, 5))
        page.wait_until("document.getElementById('head').textContent === 'Layer 1, head 5'")
        choose(page, "metric", "max_attn")
        texts, values, colours = shown_tokens(page)
        assert texts == tokens.filter(sample_id=0).sort("token_pos")["token"].to_list()
        # Exactly the Parquet's float32 values: the page shows the shortest decimal that reads back as them.
        np.testing.assert_array_equal(values.astype(np.float32), head_values(rows, "max_attn", 0, 1, 5).astype(np.float32))
        assert np.all(np.diff(luminance(colours)[np.argsort(values)]) <= 1e-9)  # a larger value, a darker colour

        page.click(*cell_centre(page, 0, 2))  # layer 0 slides over 16 keys: n = min(t + 1, 16)
        page.wait_until("document.getElementById('head').textContent === 'Layer 0, head 2'")
        choose(page, "metric", "entropy_normalized")
        _, values, colours = shown_tokens(page)
        expected = head_values(rows, "entropy_normalized", 0, 0, 2)
        np.testing.assert_allclose(values, expected, rtol=1e-6)  # float32 of polars' float64 ratio
        assert np.isnan(values[0]) and "gradient" in colours[0]  # t = 0: undefined, hatched

        page.evaluate('document.getElementById("next").click()')  # the next sample, same head and metric
        texts, values, _ = shown_tokens(page)
        assert texts == tokens.filter(sample_id=1).sort("token_pos")["token"].to_list()
        np.testing.assert_allclose(values, head_values(rows, "entropy_normalized", 1, 0, 2), rtol=1e-6)

        box = page.evaluate('(() => { const r = document.querySelectorAll("#tokens span")[7].getBoundingClientRect(); '
                            'return [r.left + r.width / 2, r.top + r.height / 2]; })()')  # fmt: skip
        page.hover(*box)
        info = page.evaluate('document.getElementById("info").textContent')
        assert info.startswith("sample 1, t 7 ") and "layer 0 head 2" in info
        lse = float(re.search(r"lse (\S+?),", info).group(1))
        assert np.float32(lse) == np.float32(head_values(rows, "lse", 1, 0, 2)[7])

        for stat in ("partial_q_entropy", "sink_attn_mean"):  # other heatmaps draw without error
            choose(page, "stat", stat)
        choose(page, "view", "raw")
        points = page.evaluate('document.getElementById("scatter").data[0].x.length')
        assert points == 3 * 30  # every shown sample's positions t >= 2
        page.screenshot(tmp_path / "explorer.png")
        assert page.errors == []
        assert all(url == path.resolve().as_uri() or url.startswith("data:") for url in page.requests), page.requests


def luminance(colours: list[str]) -> np.ndarray:
    """Perceived lightness of "rgb(r, g, b)" backgrounds."""
    rgb = np.array([[int(c) for c in re.findall(r"\d+", colour)[:3]] for colour in colours], dtype=np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])
