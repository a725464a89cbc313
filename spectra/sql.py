"""SQL over a run's Parquet files with DuckDB: the views its analysis wrote (metrics with the window-aware
ratios, samples, tokens, heads, correlations, positions), file paths resolved relative to the analysis folder,
so a run can be moved or copied. No duckdb CLI needed; the duckdb Python package comes with Spectra.

    python -m spectra.sql outputs/demo "SELECT layer, avg(entropy_normalized) FROM metrics GROUP BY 1 ORDER BY 1"
    python -m spectra.sql outputs/demo < queries.sql       # statements from stdin, each ended by ';'
    python -m spectra.sql outputs/sweep "SELECT run, avg(k_eff) FROM metrics GROUP BY run"   # a sweep's views

The folder is a run (or sweep) folder whose analysis/ holds duckdb_views.sql, or that analysis folder itself:
run `python -m spectra.analyze run_dir=<folder>` first.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from spectra.analysis.exports import VIEWS_FILE, open_views
from spectra.errors import SpectraError
from spectra.store.manifest import verified_parts

# How duckdb_views.sql names a run's parts: read_parquet('<run, relative to the views folder>/metrics/part-*.parquet')
PARTS_IN_VIEWS = re.compile(r"read_parquet\('((?:[^']|'')*)/metrics/part-\*\.parquet'\)")


def views_folder(folder: Path) -> Path:
    for candidate in (folder, folder / "analysis"):
        if (candidate / VIEWS_FILE).is_file():
            return candidate
    raise SpectraError(
        f"{folder}: no {VIEWS_FILE} here or in its analysis/; run python -m spectra.analyze run_dir={folder} first"
    )


def verify_runs(folder: Path) -> None:
    """Every run the views read, its parts verified against their manifests (the rule every reader follows)
    before DuckDB reads a row: a part damaged in place would otherwise change query results silently."""
    views = (folder / VIEWS_FILE).read_text()
    for run in PARTS_IN_VIEWS.findall(views):
        verified_parts(folder / run.replace("''", "'"))


def statements(stream) -> list[str]:
    """Statements ended by ';' (a ';' inside a string literal is not expected in these short queries)."""
    text = stream.read()
    return [part.strip() for part in text.split(";") if part.strip()]


def run_query(connection, query: str) -> None:
    import duckdb

    try:
        result = connection.sql(query)
    except duckdb.Error as error:
        raise SpectraError(f"duckdb: {str(error).splitlines()[0]}") from None
    if result is not None:  # a SELECT; CREATE, SET and the like return nothing
        result.show(max_rows=200, max_width=200)


def views(folder: Path):
    """The connection with the analysis' views; a file the views name that is gone or damaged is one line."""
    import duckdb

    try:
        return open_views(folder)
    except (duckdb.Error, OSError, UnicodeDecodeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SpectraError(
            f"{folder / VIEWS_FILE}: its views cannot be opened ({first}); run python -m spectra.analyze "
            f"run_dir=<the run or sweep folder> again"
        ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other Spectra error, not argparse's usage dump
        raise SpectraError(f"{message}; usage: python -m spectra.sql <run folder> [SQL]")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m spectra.sql", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run or sweep folder (or its analysis/ folder)")
    parser.add_argument("query", nargs="?", help="one SQL statement; without it, statements are read from stdin")
    try:
        args = parser.parse_args(argv)
        folder = views_folder(args.folder)
        verify_runs(folder)
        connection = views(folder)
        for query in [args.query] if args.query else statements(sys.stdin):
            run_query(connection, query)
    except SpectraError as error:
        print(f"spectra: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
