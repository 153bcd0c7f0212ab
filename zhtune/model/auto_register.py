"""Make transformers' Auto classes know zhtune's native models whenever zhtune has been imported.

``import zhtune`` has to stay cheap (no torch, no transformers), yet ``AutoConfig`` / ``AutoModelForCausalLM``
``.from_pretrained`` must load a converted ChatGLM-6B (``model_type`` ``zhtune_chatglm``) in any program that imported
zhtune. :func:`install` therefore registers at once when transformers' auto modules are already imported, and
otherwise puts a one-shot finder on ``sys.meta_path`` that registers right after
``transformers.models.auto.configuration_auto`` (the config) and ``...modeling_auto`` (the model classes) have run.
Only transformers' public ``register`` API is called; no transformers code is replaced.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_CONFIG = "transformers.models.auto.configuration_auto"
_MODELING = "transformers.models.auto.modeling_auto"


def register_config(configuration_auto) -> None:
    from zhtune.model.chatglm_config import MODEL_TYPE, ZhtuneChatGLMConfig

    configuration_auto.AutoConfig.register(MODEL_TYPE, ZhtuneChatGLMConfig, exist_ok=True)


def register_models(modeling_auto) -> None:
    from zhtune.model.chatglm import ZhtuneChatGLMForCausalLM, ZhtuneChatGLMModel
    from zhtune.model.chatglm_config import ZhtuneChatGLMConfig

    modeling_auto.AutoModel.register(ZhtuneChatGLMConfig, ZhtuneChatGLMModel, exist_ok=True)
    modeling_auto.AutoModelForCausalLM.register(ZhtuneChatGLMConfig, ZhtuneChatGLMForCausalLM, exist_ok=True)


_AFTER = {_CONFIG: register_config, _MODELING: register_models}


class _RunAfter(importlib.abc.Loader):
    """Delegates to the real loader, then calls ``after(module)``."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        after = _AFTER.get(fullname)
        if after is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfter(spec.loader, after)
        return spec


def install() -> None:
    """Register now for the auto modules already imported; register the others when they are imported."""
    pending = False
    for name, after in _AFTER.items():
        module = sys.modules.get(name)
        if module is not None:
            after(module)
        else:
            pending = True
    if pending and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
