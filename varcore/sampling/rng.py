"""Generators from seeds, so that distinct seeds give distinct random streams on every device.

``torch.Generator("cpu").manual_seed(s)`` initialises its Mersenne Twister from the low 32 bits of ``s`` only:
``s`` and ``s + 2**32`` give the same numbers. A CUDA generator (Philox) uses all 64 bits. :func:`seeded_generator`
keeps ``manual_seed`` wherever it is faithful (any seed on CUDA, seeds below 2**32 on the CPU, so those streams
are the familiar ones) and fills the CPU twister's whole 624-word state from the seed otherwise (numpy's
``SeedSequence`` of the seed), so that seeds up to 2**64 - 1 select distinct streams there too.
"""
import numpy as np
import torch

__all__ = ["seeded_generator", "check_seed", "SEED_LIMIT"]

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
