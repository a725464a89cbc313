"""Samples for a run: the built-in corpus, synthetic ids, SlimPajama and prepared token shards (conf/data)."""
