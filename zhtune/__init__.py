"""zhtune: LoRA instruction tuning → merge → domain LoRA (Chinese GEC) → evaluation → serving.

The package is layered; imports flow one way: ``config`` ← ``data``, ``model`` ← ``train``, ``merge``,
``infer`` ← ``gec`` ← ``cli``, ``serve``.
"""

__version__ = "0.1.0"
