"""Weights & Biases, or nothing (conf/logger)."""
