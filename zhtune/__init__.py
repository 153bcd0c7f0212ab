"""zhtune: LoRA instruction tuning → merge → domain LoRA (Chinese GEC) → evaluation → serving.

The package is layered; imports flow one way: ``config`` ← ``data``, ``model`` ← ``train``, ``merge``,
``infer`` ← ``gec`` ← ``cli``, ``serve``.

Importing zhtune registers its native models (the converted ChatGLM-6B, ``model_type`` ``zhtune_chatglm``) with
transformers' Auto classes, lazily: nothing heavy is imported here (:mod:`zhtune.model.auto_register`).
"""

__version__ = "0.1.0"

from zhtune.model.auto_register import install as _install_auto_register  # noqa: E402

_install_auto_register()
