"""Inference layer: batched generation with the same templates and tokenization as training."""
