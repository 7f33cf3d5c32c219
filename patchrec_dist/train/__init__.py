"""Training-loop pieces: checkpoints (local or fsspec URL) and graceful stop on signals."""
