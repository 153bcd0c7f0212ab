"""Model layer: loading tokenizers and checkpoints, LoRA targets and attachment."""
