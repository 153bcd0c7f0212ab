"""The configuration of zhtune's native ChatGLM-6B (``model_type`` ``zhtune_chatglm``), apart from the model code.

Kept in its own module so that registering it with ``AutoConfig`` imports nothing but transformers' config base
(see :mod:`zhtune.model.auto_register`); the model itself is :mod:`zhtune.model.chatglm`.
"""

from __future__ import annotations

from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "zhtune_chatglm"


class ZhtuneChatGLMConfig(PretrainedConfig):
    """The ChatGLM-6B shape (defaults: the released 6B model) and its special token ids."""

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 32,
        intermediate_size: int = 16384,
        layer_norm_eps: float = 1e-5,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 130004,
        eos_token_id: int | list[int] = 130005,
        pad_token_id: int = 3,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        tie_word_embeddings: bool = False,
        alpha_layers: int = 28,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        # residuals are scaled by sqrt(2 * alpha_layers); the original GLMBlock takes num_layers=28 as a default
        # argument its model never passes, so every ChatGLM-6B uses 28 whatever its depth
        self.alpha_layers = alpha_layers
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
