"""PARSampler's per-image seeds: an image's tokens depend on its own seed and label, not on its batch."""
import pytest
import torch

from tiny_gpt import one_thread, tiny  # noqa: F401  (one_thread is an autouse fixture)
from varcore.sampling.par import PARSampler

SEEDS = [7, 2 ** 40 + 3, 11, 2 ** 63 + 5]  # CPU seeds above 2**32 too (seeded_generator fills the whole state)


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("settings", [dict(cfg_scale=1.5), dict(cfg_scale=1.0, top_k=6, top_p=0.9)])
def test_each_image_is_the_one_drawn_alone(M, fast, settings):
    model = tiny(M=M, grid=8, seed=M)
    sampler = PARSampler(model, fast=fast)
    labels = torch.tensor([0, 2, 3, 1])
    batch = sampler.sample_tokens(labels, seeds=SEEDS, **settings)
    alone = torch.cat([sampler.sample_tokens(labels[i:i + 1], seeds=[s], **settings) for i, s in enumerate(SEEDS)])
    assert torch.equal(batch, alone)
    # the reversed batch gives the same images, reversed
    assert torch.equal(sampler.sample_tokens(labels.flip(0), seeds=SEEDS[::-1], **settings), batch.flip(0))
    # one shared generator draws image 0 as the per-image seed does, the others from the continued stream
    shared = sampler.sample_tokens(labels, generator=torch.Generator().manual_seed(SEEDS[0]), **settings)
    assert not torch.equal(shared[1:], batch[1:])


def test_the_same_label_under_other_seeds_differs():
    sampler = PARSampler(tiny(M=2, grid=8))
    tokens = sampler.sample_tokens([1, 1, 1], seeds=[0, 1, 2])
    assert len({tuple(t.flatten().tolist()) for t in tokens}) == 3


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seeds=[0, 1], generator=torch.Generator()), ValueError, "either generator or seeds"),
    (dict(seeds=[0]), ValueError, "seeds must hold B=2 ints"),
    (dict(seeds=[0, -1]), ValueError, r"seeds must be in \[0, 2\*\*64\)"),
    (dict(seeds=[0, 1.5]), ValueError, "seeds must hold B=2 ints"),
])
def test_bad_seeds_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        PARSampler(tiny(M=2, grid=8)).sample_tokens([0, 1], **kwargs)
