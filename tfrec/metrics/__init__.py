"""Metrics of ranked lists and retrieval (numpy), below the models as tfrs.metrics is.

Pure functions of ids, scores and labels, so training callbacks, evaluation workflows
and benches all judge models with the same code.
"""
