"""Two-tower retrieval, the multi-task ranker, their towers, losses and list helpers."""
