"""Data: sources, cleaning rules, dedup and the pretraining-corpus stage."""
