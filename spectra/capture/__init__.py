"""The attention hook and the pure metric math it feeds (conf/metrics, conf/hardware)."""
