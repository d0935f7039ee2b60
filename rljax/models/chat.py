"""Chat formats (TRL 0.7.11's ``trl.models.utils``): ``ChatMlSpecialTokens`` and
``setup_chat_format``, which adds ChatML's special tokens to a tokenizer and grows the
model's token embeddings and LM head (params included) to the new vocabulary.

New rows take the mean of the existing rows (recent transformers' ``resize_token_embeddings``
does the same; transformers 4.38, TRL 0.7.11's, drew them from N(0, initializer_range)).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class ChatMlSpecialTokens:
    """ChatML's special tokens and chat template (TRL's values)."""

    bos_token: str = "<|im_start|>"
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|im_end|>"

    @property
    def system(self) -> str:
        return f"{self.bos_token}system"

    @property
    def user(self) -> str:
        return f"{self.bos_token}user"

    @property
    def assistant(self) -> str:
        return f"{self.bos_token}assistant"

    @property
    def chat_template(self) -> str:
        return (
            "{% for message in messages %}"
            f"{{{{'{self.bos_token}' + message['role'] + '\n' + message['content'] + '{self.eos_token}' + '\n'}}}}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            f"{{{{ '{self.assistant}\n' }}}}"
            "{% endif %}"
        )


FORMAT_MAPPING = {"chatml": ChatMlSpecialTokens}


def _lm_of(module: Any) -> Any:
    return getattr(module, "lm", module)  # CausalLMWithValueHead wraps the LM


def resize_token_embeddings(module: Any, params: Any, new_num_tokens: int,
                            pad_to_multiple_of: Optional[int] = None) -> Tuple[Any, Any]:
    """``(module, params)`` with ``vocab_size = new_num_tokens`` (rounded up to
    ``pad_to_multiple_of``): every param whose shape changes (token embedding rows, the untied
    head's columns and bias) keeps its old entries and fills new ones with the mean of the old.
    Works for any rljax causal LM, with or without a value head."""
    if pad_to_multiple_of:
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    lm = _lm_of(module)
    old = lm.config.vocab_size
    if new_num_tokens == old:
        return module, params
    new_lm = lm.clone(config=dataclasses.replace(lm.config, vocab_size=int(new_num_tokens)))
    new_module = module.clone(lm=new_lm) if new_lm is not lm and module is not lm else new_lm
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: new_module.init(jax.random.PRNGKey(0), ids))["params"]

    def fit(x, target):
        if x.shape == target.shape:
            return x
        axes = [i for i, (a, b) in enumerate(zip(x.shape, target.shape)) if a != b]
        if len(axes) != 1 or x.shape[axes[0]] != old:
            raise ValueError(f"cannot resize a param of shape {x.shape} to {target.shape}")
        ax = axes[0]
        if target.shape[ax] < old:
            return jax.lax.slice_in_dim(x, 0, target.shape[ax], axis=ax)
        mean = jnp.mean(x.astype(jnp.float32), axis=ax, keepdims=True).astype(x.dtype)
        extra = jnp.repeat(mean, target.shape[ax] - old, axis=ax)
        return jnp.concatenate([x, extra], axis=ax)

    return new_module, jax.tree_util.tree_map(fit, params, shapes)


def setup_chat_format(model: Any, tokenizer: Any, format: Optional[str] = "chatml",
                      resize_to_multiple_of: Optional[int] = None) -> Tuple[Any, Any]:
    """TRL's ``setup_chat_format``: ChatML bos/eos/pad tokens and chat template on
    ``tokenizer``; the model's embeddings and head resized to ``len(tokenizer)`` (rounded up
    to ``resize_to_multiple_of``), params included; the generation config's token ids updated.

    model: an rljax model shell (changed in place and returned) or a ``(module, params)`` pair
    (a new pair is returned). Returns ``(model, tokenizer)``.
    """
    if format not in FORMAT_MAPPING:
        raise ValueError(f"Format {format} not available. Please use one of {list(FORMAT_MAPPING)}")
    chat_format = FORMAT_MAPPING[format]()
    tokenizer.eos_token = chat_format.eos_token
    tokenizer.pad_token = chat_format.pad_token
    tokenizer.bos_token = chat_format.bos_token
    tokenizer.add_special_tokens({"additional_special_tokens": [chat_format.bos_token, chat_format.eos_token]})
    tokenizer.chat_template = chat_format.chat_template
    if isinstance(model, tuple):
        return resize_token_embeddings(*model, len(tokenizer), resize_to_multiple_of), tokenizer
    from rljax.models.auto import HFConfig

    module, params = resize_token_embeddings(model.module, model.params, len(tokenizer), resize_to_multiple_of)
    model.module, model.params = module, params
    model.config = HFConfig(_lm_of(module).config, model._config_changed, model.config.extras)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id = tokenizer.bos_token_id
        gen.eos_token_id = tokenizer.eos_token_id
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
