"""Parquet parts, the part manifest and resume."""
