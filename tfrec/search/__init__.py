"""Catalog search: graded judgments -> BERT two-tower + in-graph BM25 -> ranker -> export.

One application on top of the shared layers (data, features, text, models, training),
like the recommendation workflow.
"""
