"""``PARSampler``: PAR's parallel decoding and LlamaGen's raster decoding for :class:`varcore.models.gpt.Transformer`.

Steps for a G x G grid (L = G*G tokens, n = M*M tokens per parallel step), spec ``code_par_llamagen.md`` B.5:

1. prefill the class token at position 0 and draw t_0;
2. n - 1 single-token steps at positions 1 .. n-1 draw t_1 .. t_{n-1} (one per region, in region order);
3. the transition step feeds [t_{n-1}, s_0 .. s_{n-2}] at positions n .. 2n-1 and draws group 1 (n tokens);
4. L/n - 2 more steps each feed the group just drawn and draw the next one.

That is 1 + (n - 1) + (L/n - 1) forward passes: 576 raster, 147 for M=2 and 51 for M=4 on a 24 x 24 grid.

The parity mode's random draws are those of the official ``generate``: the same filters in the same order
(temperature, top-k, top-p as HuggingFace, softmax) and one ``torch.multinomial`` per step over the (B * tokens, V)
probabilities, from ``generator`` or else the global RNG, so ``torch.manual_seed(s)`` before a call reproduces the
official tokens.
CFG is constant: ``uncond + (cond - uncond) * cfg_scale`` with the batch doubled by the null class; with
``cfg_interval > -1`` a step whose counter exceeds it uses the conditional logits alone (the counter runs over the
single-token steps and then restarts for the parallel steps, advancing by n, as official; the prefill is always
guided). The KV cache is static and each step attends to the filled prefix only.

Two modes share this loop. The default (``fast=False``) runs the model's own modules and reproduces the official
draws (RNG parity, checked against golden outputs). ``fast=True`` runs the steps through
:class:`varcore.sampling.par_fast.FastDecoder` (prepacked weights, fused SwiGLU, CFG mixed before the head; logits
equal the parity mode's up to float rounding, ~1e-5) and draws by inverting each row's CDF with one uniform
(:func:`varcore.sampling.draw.inverse_cdf_sample`): the same distribution without ``multinomial``'s exponential
per vocabulary entry, which costs more than the whole rest of the draw on a CPU. It is the mode to use for speed,
for raster and PAR alike. ``draw=`` picks the draw independently of the mode: ``fast=True, draw="multinomial"``
follows the official RNG stream, so its tokens equal the parity mode's except after a near-tie.
"""
import math
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from varcore.models.gpt import Transformer, unwrap_compiled
from varcore.ops.par_order import par_scatter
from varcore.sampling.draw import (check_images_finite, check_number, inverse_cdf_sample, nonfinite_rows,
                                   raise_if_nonfinite, top_k_top_p_filtering)
from varcore.sampling.par_fast import FastDecoder

__all__ = ["PARSampler", "top_k_top_p_filtering", "num_steps", "to_uint8", "check_num_tokens"]


def num_steps(L: int, M: int) -> int:
    """Forward passes to generate L tokens with M x M parallel regions (L for M = 1)."""
    n = M * M
    if L % n or L < n:
        raise ValueError(f"L={L} must be a positive multiple of M*M={n}")
    return 1 + (n - 1) + (L // n - 1)


def check_num_tokens(N, L: int, a: int, g: int, name: str = "num_tokens") -> int:
    """A prefix length a sampler can stop at: in [1, L], at most the ``a`` tokens drawn one at a time or those
    plus whole steps of ``g``. Raises a ValueError naming ``name``."""
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N <= L:
        raise ValueError(f"{name} must be an int in [1, block_size={L}], got {N!r}")
    if N > a and (N - a) % g:
        raise ValueError(f"{name} must be at most {a} or {a} plus a multiple of {g} (tokens per parallel step), "
                         f"got {N}")
    return N


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) as the official sampler saves them."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


class PARSampler:
    """Samples tokens (and images through an optional VQ-16 ``vq``) from a PAR or LlamaGen ``model``.

    A ``torch.compile``'d model is sampled through its original module. ``M`` defaults to the model's
    (``sqrt(ar_token_num)``; 1 for LlamaGen's raster models) and must match it: the
    transition tokens and the RoPE layout are trained for one M. ``progress`` shows a bar over the steps.
    ``fast=True`` selects the fast mode (module docstring); it packs the weights into a decode layout when the
    sampler is built and again when a call finds that the model's parameters have changed. ``draw`` is
    ``"multinomial"`` (the official draw) or ``"inverse_cdf"`` (one uniform per row); None picks the mode's own
    (multinomial for parity, inverse_cdf for fast).
    """

    DRAWS = ("multinomial", "inverse_cdf")

    def __init__(self, model: Transformer, vq=None, M: Optional[int] = None, progress: bool = False,
                 fast: bool = False, draw: Optional[str] = None):
        model = unwrap_compiled(model)
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a varcore.models.gpt.Transformer, got {type(model).__name__}")
        if M is not None and (isinstance(M, bool) or not isinstance(M, int)):
            raise TypeError(f"M must be an int or None, got {type(M).__name__}")
        if M is not None and M != model.M:
            raise ValueError(f"M={M} does not match the model, which was built for M={model.M} "
                             f"(ar_token_num={model.ar_token_num})")
        if vq is not None and not hasattr(vq, "decode_code"):
            raise TypeError(f"vq must be a VQ-16 tokenizer (varcore.models.vq16.VQModel), got {type(vq).__name__}")
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be a bool, got {type(fast).__name__}")
        if draw is not None and draw not in self.DRAWS:
            raise ValueError(f"draw must be one of {self.DRAWS} or None, got {draw!r}")
        self.draw = draw or ("inverse_cdf" if fast else "multinomial")
        self.model, self.vq, self.M, self.progress = model, vq, model.M, progress
        self.decoder = FastDecoder(model) if fast else None
        self.grid, self.L = model.config.grid, model.block_size

    @property
    def steps(self) -> int:
        """Forward passes per call."""
        return num_steps(self.L, self.M)

    def _labels(self, labels) -> torch.Tensor:
        device = self.model.tok_embeddings.weight.device
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels]
        if isinstance(labels, (list, tuple)):
            labels = torch.tensor(labels, device=device)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, a list of ints or an int, got {type(labels).__name__}")
        if labels.ndim != 1 or labels.numel() == 0 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be a non-empty 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if int(labels.min()) < 0 or int(labels.max()) >= self.model.num_classes:
            raise ValueError(f"labels must be in [0, {self.model.num_classes}), got {labels.tolist()}")
        return labels.to(device=device, dtype=torch.long)

    def _draw(self, logits, temperature, top_k, top_p, sample_logits, generator, nonfinite):
        """(B, n, V) logits -> (B, n) tokens: one draw over B*n rows (with ``multinomial``, the official
        ``sample_multi``)."""
        B, n, V = logits.shape
        logits = logits.reshape(B * n, V)
        if temperature != 1.0:  # x / 1.0 == x: skip a pass over the (B * n, V) logits
            logits = logits / max(temperature, 1e-5)
        elif top_k > 0 or top_p < 1.0:
            logits = logits.clone()  # the filters work in place
        if top_k > 0 or top_p < 1.0:
            logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
        # a non-finite row makes both random draws refuse (sample_tokens then names the cause) and the greedy one
        # return token 0 (sample_tokens raises after the loop): flag it, one reduction on the device
        nonfinite.logical_or_(nonfinite_rows(logits).any())
        probs = F.softmax(logits, dim=-1)
        if sample_logits and self.draw == "inverse_cdf":
            idx = inverse_cdf_sample(probs, generator=generator)
        elif sample_logits:
            idx = torch.multinomial(probs, num_samples=1, generator=generator)
        else:
            idx = torch.topk(probs, k=1, dim=-1)[1]
        return idx.view(B, n)

    def _layout(self, num_tokens: Optional[int], steps: Optional[Tuple[int, int]]) -> Tuple[int, int, int]:
        """(N, a, g): N tokens, the first a drawn one at a time, then g per step; checked against the model."""
        model = self.model
        a, g = (model.ar_token_num, model.spe_token_num + 1) if steps is None else steps
        for name, v in (("tokens drawn one at a time", a), ("tokens per parallel step", g)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= self.L:
                raise ValueError(f"steps: {name} must be an int in [1, {self.L}], got {v!r}")
        N = check_num_tokens(self.L if num_tokens is None else num_tokens, self.L, a, g)
        if N > a and g != model.spe_token_num + 1:
            raise ValueError(f"{g} tokens per parallel step need {g - 1} transition tokens; the model has "
                             f"spe_token_num={model.spe_token_num}")
        return N, a, g

    @torch.no_grad()
    def sample_tokens(self, labels: Union[torch.Tensor, Sequence[int], int], cfg_scale: float = 1.5,
                      cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      sample_logits: bool = True, generator: Optional[torch.Generator] = None,
                      order: str = "raster", num_tokens: Optional[int] = None,
                      steps: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Tokens for ``labels`` (B,): (B, G, G) int64 in raster order, or (B, L) in PAR order with
        ``order="par"``. ``cfg_scale`` <= 1 disables guidance (no doubled batch).

        ``num_tokens`` (PAR order only) stops after the first tokens of the sequence, as the official ``generate``
        does for ``max_new_tokens`` below the block size: at most the tokens drawn one at a time, or those plus
        whole parallel steps. ``steps`` = (a, g) overrides the model's layout (a = ``ar_token_num`` tokens drawn
        one at a time, then g = ``spe_token_num + 1`` per step); the official ``generate`` decodes with its own
        ``ar_token_num`` whatever the model was built with, and :func:`varcore.models.gpt.generate` passes it here.
        """
        model = self.model
        if order not in ("raster", "par"):
            raise ValueError(f"order must be 'raster' or 'par', got {order!r}")
        if order == "raster" and (num_tokens is not None or steps is not None):
            raise ValueError("num_tokens and steps need order='par' (a raster grid needs every token of the model's "
                             "layout)")
        N, a, g = self._layout(num_tokens, steps)
        check_number("cfg_scale", cfg_scale, 0.0)
        check_number("cfg_interval", cfg_interval, -math.inf)
        check_number("temperature", temperature, 0.0)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        check_number("top_p", top_p, 0.0, 1.0)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= model.vocab_size:
            raise ValueError(f"top_k must be an int in [0, V={model.vocab_size}] (0 disables it), got {top_k!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        labels = self._labels(labels)
        B, cfg = labels.shape[0], cfg_scale > 1.0
        half = model.tok_embeddings.weight.dtype in (torch.bfloat16, torch.float16)
        draw = dict(temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=sample_logits,
                    generator=generator)

        def step(h, start, guided):
            # token inputs are shared by both CFG halves; the prefill brings its own null-class half
            h = torch.cat([h, h]) if cfg and h.shape[0] == B else h
            if self.decoder is not None:
                return self._draw(self.decoder.step(h, start, cfg_scale, guided), **draw)
            # the official decoding steps (not the prefill) run under sdp_kernel(math only); in half precision
            # the math kernel rounds differently from the default CPU kernel (float32 attention is our own)
            with sdpa_kernel(SDPBackend.MATH) if start > 0 and half else nullcontext():
                logits = model.forward_cached(h, start)
            if cfg:
                cond, uncond = logits.chunk(2)
                logits = uncond + (cond - uncond) * cfg_scale if guided else cond
            return self._draw(logits, **draw)

        was_training = model.training
        model.eval()
        if self.decoder is not None:
            if not self.decoder.is_current():
                self.decoder = FastDecoder(model)
            self.decoder.setup(2 * B if cfg else B, N + 1)
        else:  # the class token and N tokens, as official
            model.setup_caches(2 * B if cfg else B, N + 1, model.tok_embeddings.weight.dtype)
        seq = torch.empty(B, N, dtype=torch.long, device=labels.device)
        draw["nonfinite"] = torch.zeros((), dtype=torch.bool, device=labels.device)  # set by any bad row
        total = min(N, a) + (N - a) // g if N > a else N
        bar = tqdm(total=total, disable=not self.progress, desc=f"PAR M={self.M}", dynamic_ncols=True)
        try:
            cond_h = model.cls_embedding(labels, train=False)
            if cfg:
                cond_h = torch.cat([cond_h, model.cls_embedding(torch.full_like(labels, model.num_classes), False)])
            seq[:, :1] = step(cond_h, 0, True)
            bar.update(1)
            for i in range(min(N, a) - 1):  # first token of every region, one at a time
                guided = not (cfg_interval > -1 and i > cfg_interval)
                seq[:, i + 1:i + 2] = step(model.tok_embeddings(seq[:, i:i + 1]), i + 1, guided)
                bar.update(1)
            if N > a:
                h = model.transition_embeddings(seq[:, a - 1:a])
            for j, i in enumerate(range(0, N - a, g)):  # one group (g tokens) per step
                guided = not (cfg_interval > -1 and i > cfg_interval)
                seq[:, a + i:a + g + i] = step(h, a + j * g, guided)
                h = model.tok_embeddings(seq[:, a + i:a + g + i])
                bar.update(1)
        except (RuntimeError, ValueError):  # a draw refused non-finite probabilities: say why
            raise_if_nonfinite(draw["nonfinite"], "the GPT sampler", cfg_scale if cfg else None)
            raise
        finally:
            bar.close()
            if self.decoder is not None:
                self.decoder.release()
            else:
                model.clear_caches()
            model.train(was_training)
        raise_if_nonfinite(draw["nonfinite"], "the GPT sampler", cfg_scale if cfg else None)
        return seq if order == "par" else par_scatter(seq, self.M)

    @torch.no_grad()
    def sample(self, labels: Union[torch.Tensor, Sequence[int], int], cfg_scale: float = 1.5,
               cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None, image_size: Optional[int] = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) decoded by the VQ tokenizer, bicubic-resized to ``image_size`` when given
        (the official evaluation samples at 384 and resizes to 256)."""
        if self.vq is None:
            raise ValueError("sample() needs a VQ tokenizer: PARSampler(model, vq=...); use sample_tokens() "
                             "for tokens only")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        tokens = self.sample_tokens(labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                                    top_k=top_k, top_p=top_p, generator=generator, order="raster")
        B = tokens.shape[0]
        shape = (B, self.vq.config.codebook_embed_dim, self.grid, self.grid)
        images = self.vq.decode_code(tokens.reshape(B, -1).to(self.vq.quant_conv.weight.device), shape)
        if image_size is not None and image_size != images.shape[-1]:
            images = F.interpolate(images, size=(image_size, image_size), mode="bicubic")
        return check_images_finite(images, "the GPT sampler")
