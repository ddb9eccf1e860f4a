"""Sequence-level methods built on per-token tensors (baselines, masks, policy losses)."""
