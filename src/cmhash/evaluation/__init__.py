"""Retrieval metrics and how they are shown.

ranking.py        the Hamming ranking and the MAP family (exact, tie-aware, chance, cosine), numpy
ranking_torch.py  MAP@K and MAP@all with torch, on any device (the GPU path)
curves.py         precision-recall over Hamming radius and precision@N, for DVC plots
tables.py         evaluate's paper-style MAP and Recall@K tables
recall.py         Recall@K of the paired item (any caption of an image counts), for collections with or without labels
"""
