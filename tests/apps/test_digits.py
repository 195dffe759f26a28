"""The digits data, the quality harness, the training recipe's determinism and the bundled models."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from varcore.digits import (BUNDLED, CoDeBundle, DigitsSampler, GPTBundle, VARBundle, bundled_names, load_bundled)
from varcore.digits.data import augment, load_digits
from varcore.digits.quality import (class_consistency, classifier_features, frechet_distance, load_classifier,
                                    reference_features)
from varcore.digits.recipe import ARCHS, WEIGHTS_DIR, read_metadata, weights_path
from varcore.digits.training import DigitsRecipe, train_digits


# ---------------------------------------------------------------------------------------------- data
def test_splits_are_disjoint_stratified_and_complete():
    xa, ya = load_digits("all")
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xa.shape == (1797, 3, 16, 16) and len(ytr) + len(yte) == 1797
    assert xa.min() >= -1 and xa.max() <= 1
    # every test image is an image of the whole set that is not in the train split
    key = lambda x: {tuple(v.tolist()) for v in x[:, 0].flatten(1)}
    assert not key(xtr) & key(xte)
    frac = torch.bincount(yte, minlength=10).float() / torch.bincount(ya, minlength=10).float()
    assert torch.allclose(frac, torch.full((10,), 0.2), atol=0.01)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_load_digits_sizes(size):
    x, y = load_digits("test", size=size)
    assert x.shape[1:] == (3, size, size) and torch.equal(x[:, 0], x[:, 2])


def test_augment_shifts_within_bounds_and_is_seeded():
    x, _ = load_digits("test")
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = augment(x, g1), augment(x, g2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    # each output is the input moved by (dy, dx) in [-1, 1]^2 with background fill: find the shift per image
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(0, len(x), 37):
        hits = [(dy, dx) for dy in range(3) for dx in range(3)
                if torch.equal(padded[i, :, dy:dy + 16, dx:dx + 16], a[i])]
        assert hits, f"image {i} is not a one-pixel shift of its input"
    assert torch.equal(augment(x, max_shift=0), x)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_digits("val")
    with pytest.raises(ValueError, match="size"):
        load_digits("train", size=4)
    with pytest.raises(ValueError, match="name must be one of"):
        load_bundled("digits-nope")


# ---------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_frechet_matches_sqrtm_formula_and_population_value():
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    for D in (2, 7, 16):
        opts = dict(generator=g, dtype=torch.float64)
        var_a, var_b = torch.rand(D, **opts) + 0.2, torch.rand(D, **opts) + 0.2
        mu_a, mu_b = torch.randn(D, **opts), torch.randn(D, **opts)
        fa = torch.randn(20000, D, **opts) * var_a.sqrt() + mu_a
        fb = torch.randn(20000, D, **opts) * var_b.sqrt() + mu_b
        # the textbook formula on the sample statistics, with scipy's general matrix square root
        ca, cb = np.cov(fa.numpy(), rowvar=False), np.cov(fb.numpy(), rowvar=False)
        want = float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real))
        assert frechet_distance(fa, fb) == pytest.approx(want, rel=1e-6, abs=1e-8)
        # diagonal Gaussians: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2, up to sampling error
        pop = float(((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
        assert frechet_distance(fa, fb) == pytest.approx(pop, rel=0.05, abs=0.01)


def test_frechet_checks_shapes():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_harness_on_real_digits(classifier):
    x, y = load_digits("test")
    x01 = x.add(1).mul(0.5)
    assert class_consistency(classifier, x01, y) >= 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert class_consistency(classifier, x01, shuffled) <= 0.3
    ref = reference_features(classifier, "test")
    assert abs(frechet_distance(ref, ref)) < 1e-3  # zero up to float64 round-off on traces of ~1e3
    train = reference_features(classifier, "train")
    noise = classifier_features(classifier, torch.rand(400, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    blank = classifier_features(classifier, torch.zeros(400, 3, 16, 16))
    real_vs_real = frechet_distance(train, ref)
    assert real_vs_real < 0.05 * frechet_distance(noise, ref)
    assert real_vs_real < 0.05 * frechet_distance(blank, ref)
    # a generator that draws only one class is consistent for that class but far in Fréchet distance
    ones = x01[y == 1]
    assert class_consistency(classifier, ones, torch.ones(len(ones), dtype=torch.long)) >= 0.9
    assert frechet_distance(classifier_features(classifier, ones), ref) > 5 * real_vs_real


# ---------------------------------------------------------------------------------------------- recipe
STAGES_UNDER_TEST = ["classifier", "vq", "gpt-par"]


def _tensors(root, stage):
    return load_file(str(weights_path(stage, root)))


def test_recipe_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        train_digits(DigitsRecipe.tiny(seed=0), out_dir=root, parts=STAGES_UNDER_TEST, progress=False)
    for stage in STAGES_UNDER_TEST:
        ta, tb = _tensors(a, stage), _tensors(b, stage)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{stage} differs between two runs with seed 0"
    # a stage run alone (loading the tokenizer the first run wrote) gives the weights of the full run
    before = _tensors(a, "gpt-par")
    train_digits(DigitsRecipe.tiny(seed=0), out_dir=a, parts=["gpt-par"], progress=False)
    after = _tensors(a, "gpt-par")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # another seed gives other weights
    train_digits(DigitsRecipe.tiny(seed=1), out_dir=tmp_path / "c", parts=["classifier"], progress=False)
    tc, ta = _tensors(tmp_path / "c", "classifier"), _tensors(a, "classifier")
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


VAR8_STAGES = ["vqvae8", "var8-drafter", "var8-refiner"]


def test_var8_recipe_is_deterministic_and_its_stages_run_alone(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = train_digits(DigitsRecipe.tiny(seed=0), out_dir=a, parts=VAR8_STAGES, progress=False)
    assert all(ra[s]["seconds"] >= 0 for s in VAR8_STAGES)  # the metadata times every stage
    train_digits(DigitsRecipe.tiny(seed=0), out_dir=b, parts=["vqvae8"], progress=False)
    for stage in ["var8-refiner", "var8-drafter"]:  # alone, in another order, on the tokenizer read back
        train_digits(DigitsRecipe.tiny(seed=0), out_dir=b, parts=[stage], progress=False)
    for stage in VAR8_STAGES:
        ta, tb = _tensors(a, stage), _tensors(b, stage)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f"{stage} differs between two runs with seed 0"
        assert read_metadata(stage, a)["info"]["seconds"] == ra[stage]["seconds"]
    vae, var = load_bundled("digits-var8", weights_root=a)
    assert vae.quantize.v_patch_nums == (1, 2, 3, 4, 6, 8) and var.L == 130
    with pytest.raises(FileNotFoundError, match="'vqvae8' tokenizer is not in"):
        train_digits(DigitsRecipe.tiny(), out_dir=tmp_path / "c", parts=["var8-drafter"], progress=False)


def test_recipe_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="parts"):
        train_digits(DigitsRecipe.tiny(), out_dir=tmp_path, parts=["gan"], progress=False)
    with pytest.raises(ValueError, match="var_iters"):
        DigitsRecipe(var_iters=0)
    with pytest.raises(TypeError, match="DigitsRecipe"):
        train_digits({"seed": 0}, out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- bundled
def test_bundled_weights_are_small_and_complete():
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    assert {f.stem for f in files} == set(ARCHS)
    assert sum(f.stat().st_size for f in files) <= 10 * 2 ** 20


def test_load_bundled_shapes():
    for name in bundled_names():
        bundle = load_bundled(name)
        family = BUNDLED[name].family
        assert isinstance(bundle, {"var": VARBundle, "code": CoDeBundle, "gpt": GPTBundle}[family])
        assert all(not m.training for m in bundle if isinstance(m, torch.nn.Module))
    vae, var = load_bundled("digits-var")  # drops in where a (VQVAE, VAR) pair is expected
    assert var.vae_proxy[0] is vae and var.num_classes == 10


@pytest.mark.parametrize("name", bundled_names())
def test_bundled_sampling_is_seeded(name):
    sampler = DigitsSampler(name)
    labels = [3, 1, 4]
    a = sampler.sample(labels, seed=7)
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, sampler.sample(labels, seed=7))
    assert not torch.equal(a, sampler.sample(labels, seed=8))
    with pytest.raises(ValueError, match="labels"):
        sampler.sample([10])
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample([1], top_p=0.0)


@pytest.mark.parametrize("name", ["digits-var", "digits-var8"])
def test_bundled_var_draws_the_requested_digits(classifier, name):
    # a short version of the quality target: most samples of the bundled VARs are read as their class
    labels = torch.arange(10).repeat_interleave(10)
    images = DigitsSampler(name).sample(labels, seed=0)
    assert class_consistency(classifier, images, labels) >= 0.8


def test_var8_family_shapes():
    vae, var = load_bundled("digits-var8")
    assert var.patch_nums == (1, 2, 3, 4, 6, 8) and var.L == sum(p * p for p in var.patch_nums) == 130
    images, _ = load_digits("test")
    idx_Bl = vae.img_to_idxBl(images[:2])
    assert [tuple(t.shape) for t in idx_Bl] == [(2, p * p) for p in (1, 2, 3, 4, 6, 8)]
    # x2 downsampling: 16x16 images from the 8x8 latent
    assert vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).shape == (2, 3, 16, 16)
    small = load_bundled("digits-var8-small")
    code = load_bundled("digits-code8")
    assert code.draft_steps == BUNDLED["digits-code8"].draft_steps and 0 < code.draft_steps < len(var.patch_nums)
    assert sum(p.numel() for p in small.var.parameters()) < 0.5 * sum(p.numel() for p in var.parameters())
    for m in code[1:3]:
        assert m.patch_nums == var.patch_nums and m.vae_proxy[0] is code.vae
    sampler = DigitsSampler("digits-code8")
    assert sampler.steps == 6 and sampler.decoding == f"CoDe N={code.draft_steps}"


# ---------------------------------------------------------------------------------------------- trainable
def test_bundled_transformers_train_like_loaded_ones():
    from varcore.train.var_trainer import TrainConfig, VARTrainer

    vae, var = load_bundled("digits-var")
    assert not any(p.requires_grad for p in vae.parameters())  # the tokenizer stays frozen, as official
    assert all(p.requires_grad for p in var.parameters())
    before = var.head.weight.detach().clone()
    trainer = VARTrainer(vae, var, TrainConfig(max_iters=2))
    images, labels = load_digits("train")
    metrics = trainer.train_step(labels[:4], img_B3HW=images[:4])
    assert np.isfinite(metrics["loss"]) and not torch.equal(before, var.head.weight)
    vq, gpt = load_bundled("digits-par")
    assert not any(p.requires_grad for p in vq.parameters()) and all(p.requires_grad for p in gpt.parameters())


def test_a_frozen_model_is_a_clear_error():
    from varcore.train.var_trainer import TrainConfig, VARTrainer

    vae, var = load_bundled("digits-var")
    var.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        VARTrainer(vae, var, TrainConfig(max_iters=1))


def test_training_never_writes_into_the_package_unless_asked(tmp_path):
    with pytest.raises(ValueError, match="out_dir is required"):
        train_digits(DigitsRecipe.tiny(), parts=["classifier"], progress=False)
    with pytest.raises(FileNotFoundError, match="'vq' tokenizer is not in"):
        train_digits(DigitsRecipe.tiny(), out_dir=tmp_path, parts=["gpt-par"], progress=False)
