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

Two modes share this loop and the model's one forward. The default (``fast=False``) runs the model's modules as
they are and reproduces the official draws (RNG parity, checked against golden outputs). ``fast=True`` runs the
same modules in their decode layout (:meth:`varcore.models.gpt.Transformer.pack_for_decoding`: prepacked weights,
fused norms and SwiGLU), mixes CFG on the normed hidden states before the output head (the head is linear, so
``head(u + (c - u) * s) = head(u) + (head(c) - head(u)) * s`` and only B rows, not 2B, go through the
16384-way head; logits equal the parity mode's up to float rounding, ~1e-5), and draws by inverting each row's
CDF with one uniform (:func:`varcore.sampling.draw.inverse_cdf_sample`): the same distribution without
``multinomial``'s exponential per vocabulary entry, which costs more than the whole rest of the draw on a CPU.
It is the mode to use for speed, for raster and PAR alike. ``draw=`` picks the draw independently of the mode:
``fast=True, draw="multinomial"`` follows the official RNG stream, so its tokens equal the parity mode's except
after a near-tie.

``sjd=W`` (either mode) decodes by speculative Jacobi decoding instead (:mod:`varcore.sampling.sjd`): windows of up
to W steps per forward pass, drafts verified by speculative sampling, the same distribution in fewer passes.
"""
import math
import warnings
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from varcore.models.gpt import Transformer, unwrap_compiled
from varcore.ops.par_order import par_scatter
from varcore.sampling import sjd as jacobi
from varcore.sampling.rng import generators
from varcore.sampling.draw import (check_draw, check_images_finite, check_number, draw_llamagen, draw_rows,
                                   guide_llamagen, label_tensor, probs_llamagen, raise_if_nonfinite,
                                   top_k_top_p_filtering)

__all__ = ["PARSampler", "generate", "top_k_top_p_filtering", "num_steps", "to_uint8", "check_num_tokens"]


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

    After every :meth:`sample_tokens` / :meth:`sample` call, ``forward_passes`` is the number of model forward
    calls that call made, the class-token prefill included: :attr:`steps` for plain decoding of the whole grid
    (fewer with ``num_tokens``), one per window with speculative Jacobi decoding (``sjd=``).
    """

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
        if draw is not None:
            check_draw(draw)
        self.draw = draw or ("inverse_cdf" if fast else "multinomial")
        self.model, self.vq, self.M, self.progress = model, vq, model.M, progress
        self.packed = model.pack_for_decoding() if fast else None
        self.grid, self.L = model.config.grid, model.block_size
        self.forward_passes = 0

    @property
    def steps(self) -> int:
        """Forward passes per call."""
        return num_steps(self.L, self.M)

    @staticmethod
    def _mix(z: torch.Tensor, cfg_scale: float, guided: Union[bool, torch.Tensor]) -> torch.Tensor:
        cond, uncond = z.chunk(2)
        if isinstance(guided, bool):
            return guide_llamagen(cond, uncond, cfg_scale) if guided else cond
        return torch.where(guided.view(1, -1, 1), guide_llamagen(cond, uncond, cfg_scale), cond)

    def step_logits(self, h: torch.Tensor, start: int, cfg_scale: float,
                    guided: Union[bool, torch.Tensor]) -> torch.Tensor:
        """Logits (B, n, V) of one step for the embeddings ``h`` at positions [start, start + n): rows [cond; uncond]
        (2B) mixed as ``uncond + (cond - uncond) * cfg_scale`` when ``cfg_scale > 1`` (``cond`` alone when not
        ``guided``; ``guided`` may be an (n,) bool tensor, one flag per position); the fast mode mixes the normed
        hidden states before the head, the parity mode the logits."""
        model, cfg = self.model, cfg_scale > 1.0
        if self.packed is not None:
            z = model.hidden_cached(h, start, self.packed)
            if cfg:
                z = self._mix(z, cfg_scale, guided)
            return model.logits(z, self.packed)
        # the official decoding steps (not the prefill) run under sdp_kernel(math only); in half precision the
        # math kernel rounds differently from the default CPU kernel (float32 attention is our own)
        half = h.dtype in (torch.bfloat16, torch.float16)
        with sdpa_kernel(SDPBackend.MATH) if start > 0 and half else nullcontext():
            logits = model.forward_cached(h, start)
        return self._mix(logits, cfg_scale, guided) if cfg else logits

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

    def _sjd_phase(self, h0: torch.Tensor, pos0: int, S: int, g: int, guided: Sequence[bool], W: int,
                   forward, probs, draw, generator, bar) -> torch.Tensor:
        """Tokens (B, S, g) of a phase of S steps of g tokens by speculative Jacobi decoding with windows of up to W
        steps: step s sits at positions [pos0 + s * g, pos0 + (s + 1) * g) and draws group s; its input is ``h0``
        (B, g, dim) for s = 0 and group s - 1 after. ``forward(h, start, guided)`` gives the logits of a window,
        ``probs`` their (rows, V) distributions, ``draw`` one token per row; ``generator`` draws the uniforms and
        the initial drafts; ``guided[s]`` is step s's CFG flag.

        Every row r has its own committed count c_r; a window starts at c = min over rows of c_r, so one forward
        pass serves the batch. Slot j of a window (j = 0 .. w - 1) is step c + j: its input is the token of step
        c + j - 1, the committed one where that step is below c_r and the row's draft otherwise, so its output is
        p for step c + j (the cache positions of the window are rewritten, which is the rollback; a row's
        committed tokens get their own keys and values again). Row r tests its drafts at steps c_r .. c + w - 2
        and commits the accepted ones and then, at the first rejected step, the draft where a token passed and a
        residual redraw where it failed, or, when every draft passed, the draw from the window's last output: 1
        to w - (c_r - c) steps, its own count. (c_r - c stays below w: the row at c commits at least one step.)
        The outputs' draws after a row's committed steps are its next drafts (q = the p they came from); new
        positions start from uniform random drafts with q one-hot."""
        model = self.model
        B, V, device = h0.shape[0], model.vocab_size, h0.device
        out = torch.empty(B, S, g, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.long, device=device)  # c_r: the steps each row has committed
        done_host = [0] * B
        drafts = torch.empty(B, 0, g, dtype=torch.long, device=device)  # drafts of steps c, c + 1, ...
        q = torch.empty(B, 0, g, V, device=device)  # the distribution each draft was drawn from
        c = 0
        while c < S:
            w = min(W, S - c)
            k = w - 1
            if drafts.shape[1] < k:
                new = jacobi.random_drafts(B, (k - drafts.shape[1]) * g, V, generator, device).view(B, -1, g)
                drafts = torch.cat([drafts, new], dim=1)
                q = torch.cat([q, F.one_hot(new, V).to(q.dtype)], dim=1)
            drafts, q = drafts[:, :k], q[:, :k]
            slot = torch.arange(w, device=device)
            ahead = (done - c)[:, None]  # c_r - c: the row's committed slots of this window
            committed = (slot[None, :k] < ahead)[..., None]  # (B, k, 1): steps c .. c + k - 1 already committed
            tokens = torch.where(committed, out[:, c:c + k], drafts)
            first = h0 if c == 0 else model.tok_embeddings(out[:, c - 1])
            h = torch.cat([first, model.tok_embeddings(tokens.reshape(B, k * g))], dim=1) if k else first
            flags = list(guided[c:c + w])
            mix = flags[0] if len(set(flags)) == 1 else \
                torch.tensor(flags, device=device).repeat_interleave(g)
            p_NV = probs(forward(h, pos0 + c * g, mix))
            x = draw(p_NV, B).view(B, w, g)
            p = p_NV.view(B, w, g, V)
            final = x[:, k]  # where every step passed: the draw from the window's last output
            if k == 0:
                passed = torch.zeros(B, dtype=torch.long, device=device)
            else:
                u = jacobi.uniforms(B, k * g, generator, device).view(B, k, g)
                p_d = p[:, :k].gather(-1, tokens[..., None])[..., 0]
                q_d = q.gather(-1, drafts[..., None])[..., 0]
                ok, passed = jacobi.verify(tokens, p_d, q_d, u, committed[..., 0])  # (B,) leading passed steps
            # the one host read of an iteration: each row's passed steps, which fix the next window's position
            passed_host = passed.tolist()
            if min(passed_host) < k:  # some row failed a step: its draft where a token passed, else a redraw
                at = passed.clamp(max=k - 1)[:, None, None].expand(B, 1, g)  # the first failed step's slot
                ok_at, draft_at = ok.gather(1, at)[:, 0], drafts.gather(1, at)[:, 0]
                p_at = p[:, :k].gather(1, at[..., None].expand(B, 1, g, V))[:, 0].reshape(B * g, V)
                q_at = q.gather(1, at[..., None].expand(B, 1, g, V))[:, 0].reshape(B * g, V)
                redraw = draw(jacobi.residual(p_at, q_at), B).view(B, g)
                final = torch.where((passed == k)[:, None], final, torch.where(ok_at, draft_at, redraw))
            # commit slots c_r - c .. passed_r: the accepted drafts, then the final token
            padded = torch.cat([tokens, final[:, None]], dim=1)  # (B, w, g): slot j < k a token, slot k the last
            fill = torch.where((slot[None] == passed[:, None])[..., None], final[:, None], padded)
            write = ((slot[None] >= ahead) & (slot[None] <= passed[:, None]))[..., None]
            out[:, c:c + w] = torch.where(write, fill, out[:, c:c + w])
            done = torch.maximum(done, c + passed + 1)
            done_host = [max(d, c + n + 1) for d, n in zip(done_host, passed_host)]
            c_next = min(done_host)
            drafts, q = x[:, c_next - c:], p[:, c_next - c:]
            bar.update(c_next - c)
            c = c_next
        return out

    @torch.no_grad()
    def sample_tokens(self, labels: Union[torch.Tensor, Sequence[int], int], cfg_scale: float = 1.5,
                      cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      sample_logits: bool = True, generator: Optional[torch.Generator] = None,
                      order: str = "raster", num_tokens: Optional[int] = None,
                      steps: Optional[Tuple[int, int]] = None, seeds: Optional[Sequence[int]] = None,
                      sjd: Optional[int] = None, draw: Optional[str] = None) -> torch.Tensor:
        """Tokens for ``labels`` (B,): (B, G, G) int64 in raster order, or (B, L) in PAR order with
        ``order="par"``. ``cfg_scale`` <= 1 disables guidance (no doubled batch).

        ``num_tokens`` (PAR order only) stops after the first tokens of the sequence, as the official ``generate``
        does for ``max_new_tokens`` below the block size: at most the tokens drawn one at a time, or those plus
        whole parallel steps. ``steps`` = (a, g) overrides the model's layout (a = ``ar_token_num`` tokens drawn
        one at a time, then g = ``spe_token_num + 1`` per step); the official ``generate`` decodes with its own
        ``ar_token_num`` whatever the model was built with, and :func:`generate` passes it here.

        ``seeds`` (B ints in [0, 2**64), instead of ``generator``) gives each image its own generator
        (:func:`varcore.sampling.rng.seeded_generator`): an image's tokens then depend on its seed and label only,
        not on the rest of the batch (up to the float rounding of the batched forward).

        ``sjd`` = W decodes by speculative Jacobi decoding with windows of up to W steps (drafts verified by
        speculative sampling: the same distribution in fewer forward passes; None or 0: off; docs/par.md).
        It works in both phases (the tokens drawn one at a time, then the parallel steps of M*M tokens, each window
        within one phase) with the model's own layout. With several images every image commits what it accepts, in
        windows that start where the image furthest behind stands, so with ``seeds`` an image still draws from its
        own generator but its tokens then depend on the batch. ``sjd=1`` (no drafts) gives the tokens of plain
        decoding.

        ``draw`` overrides the sampler's draw for this call (``"multinomial"`` or ``"inverse_cdf"``; None: the
        sampler's own, :attr:`draw`).
        """
        model = self.model
        if order not in ("raster", "par"):
            raise ValueError(f"order must be 'raster' or 'par', got {order!r}")
        if order == "raster" and (num_tokens is not None or steps is not None):
            raise ValueError("num_tokens and steps need order='par' (a raster grid needs every token of the model's "
                             "layout)")
        N, a, g = self._layout(num_tokens, steps)
        W = jacobi.check_window(sjd, self.L)
        method = self.draw if draw is None else check_draw(draw)
        if W and (a, g) != (model.ar_token_num, model.spe_token_num + 1):
            raise ValueError(f"sjd needs the model's own layout steps=({model.ar_token_num}, "
                             f"{model.spe_token_num + 1}) (a window's attention mask is the model's), "
                             f"got steps={steps}")
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
        labels = label_tensor(labels, model.num_classes, model.tok_embeddings.weight.device)
        B, cfg = labels.shape[0], cfg_scale > 1.0
        if seeds is not None:
            if generator is not None:
                raise ValueError("give either generator or seeds, not both")
            generator = generators(B, labels.device, seeds=seeds)
        nonfinite = torch.zeros((), dtype=torch.bool, device=labels.device)  # set by any non-finite row
        draw = dict(temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=sample_logits,
                    method=method, generator=generator, nonfinite=nonfinite)
        passes = [0]

        def forward(h, start, guided):
            # token inputs are shared by both CFG halves; the prefill brings its own null-class half
            h = torch.cat([h, h]) if cfg and h.shape[0] == B else h
            passes[0] += 1
            return self.step_logits(h, start, cfg_scale, guided)

        def step(h, start, guided):
            return draw_llamagen(forward(h, start, guided), **draw)

        def probs(logits_BnV):  # the distribution every draw of a step uses; greedy: one-hot on the argmax
            p = probs_llamagen(logits_BnV, temperature, top_k, top_p, nonfinite)
            return p if sample_logits else F.one_hot(p.topk(1, dim=-1)[1][:, 0], p.shape[-1]).to(p.dtype)

        def draw_from(weights_NV, rows):
            if not sample_logits:
                return weights_NV.topk(1, dim=-1)[1].view(-1)
            return draw_rows(weights_NV, rows, method, generator, nonfinite)

        def phase(h0, pos0, S, g, guided):
            return self._sjd_phase(h0, pos0, S, g, guided, W, forward, probs, draw_from, generator, bar)

        was_training = model.training
        model.eval()
        if self.packed is not None and not self.packed.is_current(model):
            self.packed = model.pack_for_decoding()
        model.setup_caches(2 * B if cfg else B, N + 1, model.tok_embeddings.weight.dtype)  # class token + N
        seq = torch.empty(B, N, dtype=torch.long, device=labels.device)
        total = min(N, a) + (N - a) // g if N > a else N
        bar = tqdm(total=total, disable=not self.progress, desc=f"PAR M={self.M}", dynamic_ncols=True)
        # the CFG flag of each single-token step and of each parallel step (whose counter advances by g)
        guided_single = [not (cfg_interval > -1 and i > cfg_interval) for i in range(min(N, a) - 1)]
        guided_par = [not (cfg_interval > -1 and i > cfg_interval) for i in range(0, N - a, g)]
        try:
            cond_h = model.cls_embedding(labels, train=False)
            if cfg:
                cond_h = torch.cat([cond_h, model.cls_embedding(torch.full_like(labels, model.num_classes), False)])
            seq[:, :1] = step(cond_h, 0, True)
            bar.update(1)
            if W and guided_single:
                seq[:, 1:min(N, a)] = phase(model.tok_embeddings(seq[:, :1]), 1, len(guided_single), 1,
                                            guided_single).view(B, -1)
            else:
                for i, guided in enumerate(guided_single):  # first token of every region, one at a time
                    seq[:, i + 1:i + 2] = step(model.tok_embeddings(seq[:, i:i + 1]), i + 1, guided)
                    bar.update(1)
            if N > a:
                h = model.transition_embeddings(seq[:, a - 1:a])
            if W and N > a:
                seq[:, a:] = phase(h, a, len(guided_par), g, guided_par).view(B, -1)
            else:
                for j, guided in enumerate(guided_par):  # one group (g tokens) per step
                    seq[:, a + j * g:a + (j + 1) * g] = step(h, a + j * g, guided)
                    h = model.tok_embeddings(seq[:, a + j * g:a + (j + 1) * g])
                    bar.update(1)
        except (RuntimeError, ValueError):  # a draw refused non-finite probabilities: say why
            raise_if_nonfinite(nonfinite, "the GPT sampler", cfg_scale if cfg else None)
            raise
        finally:
            self.forward_passes = passes[0]
            bar.close()
            model.clear_caches()
            model.train(was_training)
        raise_if_nonfinite(nonfinite, "the GPT sampler", cfg_scale if cfg else None)
        return seq if order == "par" else par_scatter(seq, self.M)

    @torch.no_grad()
    def sample(self, labels: Union[torch.Tensor, Sequence[int], int], cfg_scale: float = 1.5,
               cfg_interval: float = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: Optional[torch.Generator] = None, image_size: Optional[int] = None,
               seeds: Optional[Sequence[int]] = None, sjd: Optional[int] = None, draw: Optional[str] = None
               ) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) decoded by the VQ tokenizer, bicubic-resized to ``image_size`` when given
        (the official evaluation samples at 384 and resizes to 256); ``seeds``: one generator per image,
        ``sjd``: speculative Jacobi decoding with windows of up to ``sjd`` steps, and ``draw``: this call's draw
        method, as in :meth:`sample_tokens`."""
        if self.vq is None:
            raise ValueError("sample() needs a VQ tokenizer: PARSampler(model, vq=...); use sample_tokens() "
                             "for tokens only")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        tokens = self.sample_tokens(labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=temperature,
                                    top_k=top_k, top_p=top_p, generator=generator, order="raster", seeds=seeds,
                                    sjd=sjd, draw=draw)
        B = tokens.shape[0]
        shape = (B, self.vq.config.codebook_embed_dim, self.grid, self.grid)
        images = self.vq.decode_code(tokens.reshape(B, -1).to(self.vq.quant_conv.weight.device), shape)
        if image_size is not None and image_size != images.shape[-1]:
            images = F.interpolate(images, size=(image_size, image_size), mode="bicubic")
        return check_images_finite(images, "the GPT sampler")


def generate(model: Transformer, cond: torch.Tensor, max_new_tokens: int, emb_masks=None, cfg_scale: float = 1.0,
             cfg_interval: float = -1, ar_token_num: int = 4, spe_token_num: int = 3, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, sample_logits: bool = True) -> torch.Tensor:
    """PAR's ``generate`` (official signature): int32 tokens (B, max_new_tokens) in PAR order.

    Draws from the global RNG exactly as the official code does, so ``torch.manual_seed(s)`` before the call gives
    the official tokens. What the official function accepts is accepted:

    * ``max_new_tokens`` below the block size returns the first ``max_new_tokens`` tokens of the sequence
      (``ar_token_num`` plus whole parallel steps of ``spe_token_num + 1``; other counts fail officially and raise
      a ValueError here).
    * a ``torch.compile``'d model runs through its original module (varcore's decoding has its own kernels; the
      official compiled run may differ from its eager run by the compiler's rounding).
    * ``ar_token_num``/``spe_token_num`` are the decoding layout, independent of the model's, as official: the
      official demo ``sample_c2i.py`` builds ``ar_token_num=24`` models and decodes with these defaults (4, 3).
      A layout other than the model's runs as official, with a warning (the result is dubious);
      ``spe_token_num`` must be the model's (otherwise the official transition step fails).
    * ``top_k`` above the vocabulary keeps everything and ``top_k <= 0`` disables it, as official.

    On a raster model (LlamaGen: ``ar_token_num=1, spe_token_num=0``, no transition tokens) the defaults (4, 3),
    which the official PAR function cannot run there, mean LlamaGen's raster decoding; LlamaGen's own
    ``generate`` is :func:`varcore.models.llamagen.generate`. ``emb_masks`` belongs to text-conditional models and
    must be None.
    """
    if emb_masks is not None:
        raise ValueError("emb_masks is for text-conditional models; only class-conditional models are supported")
    model = unwrap_compiled(model)
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a varcore.models.gpt.Transformer, got {type(model).__name__}")
    for name, value in (("max_new_tokens", max_new_tokens), ("ar_token_num", ar_token_num),
                        ("spe_token_num", spe_token_num), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    raster_model = (model.ar_token_num, model.spe_token_num) == (1, 0)
    if raster_model and (ar_token_num, spe_token_num) == (4, 3):
        ar_token_num, spe_token_num = 1, 0
    if spe_token_num != model.spe_token_num:
        raise ValueError(f"spe_token_num={spe_token_num} must be the model's {model.spe_token_num} (the transition "
                         f"step feeds the model's transition tokens)")
    if not 1 <= ar_token_num <= model.block_size:
        raise ValueError(f"ar_token_num must be in [1, {model.block_size}], got {ar_token_num}")
    if ar_token_num != model.ar_token_num:
        warnings.warn(f"generate decodes with ar_token_num={ar_token_num} a model built for ar_token_num="
                      f"{model.ar_token_num} (as the official code does, e.g. PAR's demo sample_c2i.py with its "
                      f"defaults): the steps do not follow the model's layout and the official result is dubious; "
                      f"pass ar_token_num={model.ar_token_num}, spe_token_num={model.spe_token_num}", stacklevel=2)
    check_num_tokens(max_new_tokens, model.block_size, ar_token_num, spe_token_num + 1, "max_new_tokens")
    top_k = min(max(top_k, 0), model.vocab_size)
    return PARSampler(model).sample_tokens(cond, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                           temperature=temperature, top_k=top_k, top_p=top_p,
                                           sample_logits=sample_logits, order="par", num_tokens=max_new_tokens,
                                           steps=(ar_token_num, spe_token_num + 1)).to(torch.int32)
