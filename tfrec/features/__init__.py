"""Preprocessing and embedding layers built from the feature specification, in-graph BM25."""
