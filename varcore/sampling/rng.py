"""Generators from seeds, so that distinct seeds give distinct random streams on every device.

``torch.Generator("cpu").manual_seed(s)`` initialises its Mersenne Twister from the low 32 bits of ``s`` only:
``s`` and ``s + 2**32`` give the same numbers. A CUDA generator (Philox) uses all 64 bits. :func:`seeded_generator`
keeps ``manual_seed`` wherever it is faithful (any seed on CUDA, seeds below 2**32 on the CPU, so those streams
are the familiar ones) and fills the CPU twister's whole 624-word state from the seed otherwise (numpy's
``SeedSequence`` of the seed), so that seeds up to 2**64 - 1 select distinct streams there too.
"""
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["seeded_generator", "check_seed", "SEED_LIMIT", "check_g_seed", "model_generator", "generators"]

SEED_LIMIT = 2 ** 64
_MT_WORDS = 624
# torch's CPU generator state (CPUGeneratorImplStateLegacy): initial seed (u64), left (i32), seeded (i32),
# next (u64), the 624 state words (one per u64), then the cached normal samples; 5056 bytes.
_STATE_BYTES = 5056
_WORDS_OFFSET = 24


def check_seed(seed, name: str = "seed") -> int:
    """An int in [0, 2**64) (a bool or a float is refused)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return int(seed)


def _cpu_state(seed: int, words) -> torch.Tensor:
    """A CPU generator state with the twister's words ``words`` (624 uint32), to be twisted before the first draw
    (as right after ``manual_seed``), and ``initial_seed()`` reporting ``seed``."""
    template = torch.Generator().manual_seed(0).get_state()
    if template.numel() != _STATE_BYTES:
        raise RuntimeError(f"this torch's CPU generator state has {template.numel()} bytes, not the "
                           f"{_STATE_BYTES} varcore knows; seeds >= 2**32 cannot be given distinct streams here")
    raw = bytearray(template.numpy().tobytes())
    raw[0:8] = np.uint64(seed).tobytes()
    raw[_WORDS_OFFSET:_WORDS_OFFSET + 8 * _MT_WORDS] = np.asarray(words, dtype=np.uint64).tobytes()
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


def seeded_generator(seed: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` whose stream is selected by the whole of ``seed`` (an int in [0, 2**64))."""
    seed = check_seed(seed)
    device = torch.device(device)
    gen = torch.Generator(device)
    if device.type != "cpu" or seed < 2 ** 32:
        return gen.manual_seed(seed)
    gen.set_state(_cpu_state(seed, np.random.SeedSequence(seed).generate_state(_MT_WORDS, np.uint32)))
    return gen


def check_g_seed(g_seed) -> Optional[int]:
    """An official sampler's ``g_seed``: an int or None (a bool is refused)."""
    if g_seed is not None and (isinstance(g_seed, bool) or not isinstance(g_seed, int)):
        raise TypeError(f"g_seed must be an int or None, got {type(g_seed).__name__}")
    return g_seed


def model_generator(model, g_seed: Optional[int], device) -> Optional[torch.Generator]:
    """The official samplers' generator: ``model.rng`` reseeded with ``g_seed`` (``manual_seed``), re-created on
    ``device`` first when the model has moved; None (the global RNG) when ``g_seed`` is None."""
    if check_g_seed(g_seed) is None:
        return None
    if model.rng.device != torch.device(device):
        model.rng = torch.Generator(device=device)
    return model.rng.manual_seed(g_seed)


def generators(B: int, device, g_seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
               per_image_seeds: bool = False, seeds: Optional[Sequence[int]] = None) -> List[Optional[torch.Generator]]:
    """The generators of a batch of B: one shared by the batch (official: a fresh one seeded with ``g_seed``, the
    given ``generator``, or None for the global RNG), or one per image (``seeds``, or ``g_seed + i`` for image i
    with ``per_image_seeds``; each seed selects its stream whole, see :func:`seeded_generator`)."""
    check_g_seed(g_seed)
    device = torch.device(device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if g_seed is not None or seeds is not None or per_image_seeds:
            raise ValueError("generator cannot be combined with g_seed, seeds or per_image_seeds")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the model on {device}")
        return [generator]
    if not isinstance(per_image_seeds, bool):
        raise TypeError(f"per_image_seeds must be a bool, got {type(per_image_seeds).__name__}")
    if per_image_seeds:
        if seeds is not None:
            raise ValueError("give either per_image_seeds=True (with g_seed) or seeds, not both")
        if g_seed is None:
            raise ValueError("per_image_seeds=True needs g_seed (image i gets the seed g_seed + i)")
        seeds = [g_seed + i for i in range(B)]
    elif seeds is not None:
        if g_seed is not None:
            raise ValueError("give either g_seed or seeds, not both")
        seeds = list(seeds)
        if len(seeds) != B or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must hold B={B} ints, got {seeds!r}")
    if seeds is not None:
        return [seeded_generator(check_seed(s, "seeds"), device) for s in seeds]
    return [None if g_seed is None else torch.Generator(device).manual_seed(g_seed)]
