"""LlamaGen's class-conditional GPT and ``generate`` under LlamaGen's names and defaults (raster order).

LlamaGen's ``ModelArgs`` has no PAR fields, so a LlamaGen script that builds ``GPT_models[name](vocab_size=...,
block_size=..., ...)`` gets a raster model here (``ar_token_num=1``, no transition tokens) whose state-dict keys are
LlamaGen's, and ``generate(model, cond, max_new_tokens, emb_masks=None, cfg_scale=1.0, cfg_interval=-1,
**sampling_kwargs)`` decodes it one token per step. In a LlamaGen script, ``from autoregressive.models.gpt import
GPT_models`` becomes ``from varcore.models.llamagen import GPT_models`` and ``from autoregressive.models.generate
import generate`` becomes ``from varcore.models.llamagen import generate``. The model class is
:class:`varcore.models.gpt.Transformer` (PAR's model with M = 1).
"""
from dataclasses import dataclass

import torch

from . import gpt
from .gpt import GPT_CONFIGS, Transformer

__all__ = ["ModelArgs", "Transformer", "GPT_models", "generate"]


@dataclass
class ModelArgs(gpt.ModelArgs):
    """LlamaGen's model arguments: PAR's, with raster defaults (one token per step, no transition tokens)."""

    spe_token_num: int = 0
    ar_token_num: int = 1


GPT_models = {name: gpt._builder(name, ModelArgs) for name in GPT_CONFIGS}


def generate(model: Transformer, cond: torch.Tensor, max_new_tokens: int, emb_masks=None, cfg_scale: float = 1.0,
             cfg_interval: float = -1, **sampling_kwargs) -> torch.Tensor:
    """LlamaGen's ``generate``: int32 tokens (B, max_new_tokens) in raster order, one forward pass per token, the
    same draws as the official function after ``torch.manual_seed``. ``sampling_kwargs``: ``temperature``,
    ``top_k``, ``top_p``, ``sample_logits``. ``max_new_tokens`` may be anything in [1, block_size] (the official
    function needs at least 2); a ``torch.compile``'d model runs through its original module."""
    model_ = gpt.unwrap_compiled(model)
    if isinstance(model_, Transformer) and (model_.ar_token_num, model_.spe_token_num) != (1, 0):
        raise ValueError(f"LlamaGen's generate decodes raster models (ar_token_num=1, spe_token_num=0), got a PAR "
                         f"model with ar_token_num={model_.ar_token_num}; use varcore.models.gpt.generate")
    return gpt.generate(model, cond, max_new_tokens, emb_masks=emb_masks, cfg_scale=cfg_scale,
                        cfg_interval=cfg_interval, ar_token_num=1, spe_token_num=0, **sampling_kwargs)
