"""varcore.sampling.rng: the whole seed selects the stream, on the CPU too, and the familiar streams stay."""
import pytest
import torch

from varcore.sampling import rng
from varcore.sampling.rng import seeded_generator


def _mt_init(seed32):
    """The Mersenne Twister's initial state for a 32-bit seed (std::mt19937's recurrence)."""
    words = [seed32]
    for i in range(1, 624):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + i) & 0xFFFFFFFF)
    return words


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 32 - 1])
def test_state_layout_is_the_one_torch_writes(seed):
    """The state varcore writes for a twister's words is byte for byte what manual_seed leaves: so the layout
    (offsets of the seed, counters and words) is right, and the stream after it is the same."""
    ours = rng._cpu_state(seed, _mt_init(seed))
    theirs = torch.Generator().manual_seed(seed).get_state()
    assert torch.equal(ours, theirs)
    g = torch.Generator()
    g.set_state(ours)
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=torch.Generator().manual_seed(seed)))


def test_seeds_below_2_32_keep_manual_seed_streams():
    for seed in (0, 7, 2 ** 32 - 1):
        a = torch.randn(8, generator=seeded_generator(seed))
        assert torch.equal(a, torch.randn(8, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("seed", [0, 5, 123456789])
def test_high_bits_select_other_streams(seed):
    """manual_seed(s) and manual_seed(s + 2**32) coincide on the CPU; seeded_generator's do not."""
    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(seed)),
                       torch.rand(4, generator=torch.Generator().manual_seed(seed + 2 ** 32)))
    draws = {tuple(torch.rand(4, dtype=torch.float64, generator=seeded_generator(seed + k * 2 ** 32)).tolist())
             for k in range(6)}
    assert len(draws) == 6
    again = torch.rand(4, dtype=torch.float64, generator=seeded_generator(seed + 2 ** 32))
    assert tuple(again.tolist()) in draws  # reproducible
    assert seeded_generator(seed + 2 ** 32).initial_seed() == seed + 2 ** 32


def test_every_sampling_function_draws_from_the_new_state():
    """normal, exponential, multinomial and randint all follow the state (no cached normal sample is left over)."""
    g1, g2 = seeded_generator(2 ** 40 + 3), seeded_generator(2 ** 40 + 3)
    for fn in (lambda g: torch.randn(3, generator=g), lambda g: torch.empty(3).exponential_(generator=g),
               lambda g: torch.multinomial(torch.ones(10), 2, generator=g),
               lambda g: torch.randint(0, 9, (3,), generator=g)):
        assert torch.equal(fn(g1), fn(g2))
    assert not torch.equal(torch.randn(64, generator=seeded_generator(2 ** 40 + 3)),
                           torch.randn(64, generator=seeded_generator(2 ** 40 + 4)))


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (2 ** 64, ValueError), (1.0, TypeError), (True, TypeError),
                                     ("3", TypeError)])
def test_bad_seeds_are_refused(bad, err):
    with pytest.raises(err, match="seed"):
        seeded_generator(bad)


def test_var_sampler_per_image_seeds_use_the_whole_seed():
    """Two images whose seeds differ only above bit 32 get different tokens in VARSampler (they were identical)."""
    from varcore.digits import load_bundled
    from varcore.sampling.var import VARSampler

    b = load_bundled("digits-var")
    sampler = VARSampler(b.var, b.vae)
    s = 2 ** 33 + 11
    tokens = sampler.sample(3, torch.tensor([4, 4, 4]), cfg=2.0, seeds=[s, s + 2 ** 32, s], output="tokens")
    flat = torch.cat([t for t in tokens], dim=1)
    assert torch.equal(flat[0], flat[2])
    assert not torch.equal(flat[0], flat[1])
    with pytest.raises(ValueError, match="seeds"):
        sampler.sample(1, torch.tensor([4]), seeds=[-1], output="tokens")
