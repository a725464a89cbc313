"""Typed config schemas and the checks run before any work (conf/ holds the YAML)."""
