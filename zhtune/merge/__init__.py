"""Merge layer: fold LoRA adapters into base weights shard by shard (``merge``), prove it (``verify``)."""
