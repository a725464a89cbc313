"""Statistics, figures, reports and exports over finished runs (conf/analyze.yaml)."""
