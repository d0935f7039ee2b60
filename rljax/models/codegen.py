"""CodeGen as a Flax linen module whose parameter names map one-to-one onto HF's.

GPT-J's model (``rljax.models.gptj``: parallel block, interleaved rotary on the first
``rotary_dim`` dims, untied ``lm_head`` with a bias, HF names ``transformer.h.{i}.*``) with one
fused, bias-free projection ``attn.qkv_proj`` ([hidden, 3 * hidden] here). Its output is laid out
for 4 model-parallel shards (CodeGen's ``mp_num = 4``)::

    qkv[..., 3 * hidden] -> [4 shards, 3, hidden / 4]   each shard holds (q, v, k) -- in that order --
                                                        for heads / 4 consecutive heads

so ``num_attention_heads`` must be a multiple of 4. The rotary tables stay float32 (HF does not
cast them), and rotated q, k come back in the activations' dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn

from rljax.models.gptj import GPTJAttention, GPTJBlock, GPTJConfig, GPTJForCausalLM, GPTJModel, sinusoid_sin_cos

MP_NUM = 4  # CodeGen's fixed number of model-parallel shards in qkv_proj


@dataclasses.dataclass(frozen=True)
class CodeGenConfig(GPTJConfig):
    """Fields named as in HF's CodeGen ``config.json`` (GPT-J's, plus the unused ``n_ctx``)."""

    n_ctx: Optional[int] = 2048
    model_type: str = "codegen"

    def __post_init__(self):
        super().__post_init__()
        if self.n_head % MP_NUM:
            raise ValueError(
                f"CodeGen's qkv_proj is split into {MP_NUM} shards of whole heads: n_head ({self.n_head}) must be "
                f"a multiple of {MP_NUM}."
            )

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["architectures"] = ["CodeGenForCausalLM"]
        return d


class CodeGenAttention(GPTJAttention):
    def project_qkv(self, x):
        """q, k, v [batch, seq, heads, head_dim] from the fused projection (layout: module docstring)."""
        cfg = self.config
        b, s, _ = x.shape
        qkv = nn.Dense(3 * cfg.n_embd, use_bias=False, dtype=self.dtype, name="qkv_proj")(x)
        qkv = qkv.reshape(b, s, MP_NUM, 3, cfg.n_embd // MP_NUM)
        q, v, k = (qkv[:, :, :, j].reshape(b, s, cfg.n_head, cfg.head_dim) for j in range(3))
        return q, k, v

    def rotary_tables(self, position_ids):
        return sinusoid_sin_cos(position_ids, self.config.rotary_dim)


class CodeGenBlock(GPTJBlock):
    attention_cls = CodeGenAttention


class CodeGenModel(GPTJModel):
    """The trunk (HF ``transformer.*``). Returns (hidden after ln_f, new cache, embedding)."""

    block_cls = CodeGenBlock


class CodeGenForCausalLM(GPTJForCausalLM):
    """CodeGen causal LM (see ``rljax.models.attention.CausalLM`` for the call contract and cache)."""

    config: CodeGenConfig
    trunk_cls = CodeGenModel


def _register() -> None:
    from rljax.models.hub import Family, register_family

    register_family(
        "codegen",
        Family(
            CodeGenConfig,
            CodeGenForCausalLM,
            linear_is_transposed=True,
            ignore_keys=(r"\.attn\.causal_mask$", r"\.attn\.bias$", r"\.attn\.masked_bias$"),
            add_prefix="transformer.",
            trunk_cls=CodeGenModel,
            trunk_name="transformer",
            hf_prefix="CodeGen",
        ),
    )


_register()
