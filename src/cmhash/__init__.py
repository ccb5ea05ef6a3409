"""cmhash: unsupervised cross-modal hashing (UCMFH on CLIP features) as a DVC pipeline."""

__version__ = "0.1.0"
