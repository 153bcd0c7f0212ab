"""The main job: ``zhtune pipeline`` (instruction LoRA → merge → CGEC LoRA → merge → evaluate) and ``zhtune demo``."""
