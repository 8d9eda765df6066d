"""simcse_flat: contrastive sentence embeddings that train well at small batch sizes."""

__version__ = "0.1.0"
