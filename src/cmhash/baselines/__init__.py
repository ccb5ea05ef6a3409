"""Training-free cross-modal hashing baselines (LSH, PCA-ITQ, CCA-ITQ) and the CLIP cosine reference, in numpy."""
