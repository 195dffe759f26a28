"""The accelerator harness: configuration strings (varcore.digits.accel), DigitsSampler's pass-through, and
``varcore eval --accel`` / ``evaluate_accel`` on the bundled models."""
import json

import pytest
import torch

from varcore.__main__ import main
from varcore.digits import DigitsSampler
from varcore.digits.accel import ACCEL_OPTIONS, option_names, parse_config
from varcore.digits.evaluate import ACCEL_KEYS, ACCEL_MEASURES, SWEEP, evaluate_accel
from varcore.sampling.code import CoDeSampler
from varcore.sampling.par import PARSampler
from varcore.sampling.var import VARSampler


# ---------------------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("text, model, options, baseline", [
    ("digits-var", "digits-var", {}, "digits-var"),
    ("digits-var:prune=3:0.5,cfg_skip=1", "digits-var", {"prune": {3: 0.5}, "cfg_skip": 1}, "digits-var"),
    ("digits-code:cfg_skip=1", "digits-code", {"cfg_skip": 1}, "digits-code"),
    ("digits-var:prune=-2:0.5+-1:0.25", "digits-var", {"prune": {-2: 0.5, -1: 0.25}}, "digits-var"),
    ("digits-code:vs=digits-var,prune=2:1", "digits-code", {"prune": {2: 1.0}}, "digits-var"),
    ("digits-par:vs=digits-raster", "digits-par", {}, "digits-raster"),
    ("digits-var:kv_budget=-2:0.5", "digits-var", {"kv_budget": {-2: 0.5}}, "digits-var"),
    ("digits-raster:sjd=8", "digits-raster", {"sjd": 8}, "digits-raster"),
    ("digits-code8:draw=inverse_cdf,cfg_skip=1", "digits-code8", {"draw": "inverse_cdf", "cfg_skip": 1},
     "digits-code8"),
    ("digits-par:draw=multinomial", "digits-par", {"draw": "multinomial"}, "digits-par"),
    ("digits-code8:draft_steps=3,vs=digits-var8", "digits-code8", {"draft_steps": 3}, "digits-var8"),
])
def test_configs_parse(text, model, options, baseline):
    c = parse_config(text)
    assert (c.text, c.model, c.options, c.baseline) == (text, model, options, baseline)
    assert c.is_baseline == (not options and baseline == model)


def test_negative_scale_indices_count_from_the_last():
    bind = ACCEL_OPTIONS["prune"].bind
    assert bind({-1: 0.5, -3: 0.25}, 4) == {3: 0.5, 1: 0.25}
    assert bind({-1: 0.5}, 6) == {5: 0.5} and bind({2: 0.5}, 6) == {2: 0.5}
    assert bind({-9: 0.5}, 4) == {-9: 0.5}  # out of range: left for the sampler's own check
    with pytest.raises(ValueError, match="two indices name scale 3"):
        bind({-1: 0.5, 3: 0.25}, 4)


def test_every_family_lists_its_keys():
    assert option_names("var") == ["cfg_skip", "prune", "kv_budget", "draw", "vs"]
    assert option_names("code") == ["cfg_skip", "prune", "kv_budget", "draft_steps", "draw", "vs"]
    assert option_names("gpt") == [k for k, o in ACCEL_OPTIONS.items() if "gpt" in o.families] + ["vs"]


BAD = [
    ("nope:cfg_skip=1", "the model 'nope' is not one of"),
    ("digits-var:foo=1", "'foo' is an unknown key; the keys of digits-var: cfg_skip=K"),
    ("digits-par:cfg_skip=1", "'cfg_skip' is not an option of digits-par (a gpt model)"),
    ("digits-var:cfg_skip", "'cfg_skip' is not KEY=VALUE"),
    ("digits-var:", "'' is not KEY=VALUE"),
    ("digits-var:cfg_skip=1,", "'' is not KEY=VALUE"),
    ("digits-var:cfg_skip=x", "cfg_skip='x': not an int; expected cfg_skip=K"),
    ("digits-var:cfg_skip=1,cfg_skip=2", "cfg_skip is given twice"),
    ("digits-var:prune=3", "prune='3': '3' is not SI:R; expected prune=SI:R"),
    ("digits-var:prune=3:2", "the keep ratio 2 is not in (0, 1]"),
    ("digits-var:prune=3:0", "the keep ratio 0 is not in (0, 1]"),
    ("digits-var:prune=3:nan", "the keep ratio nan is not in (0, 1]"),
    ("digits-var:prune=x:0.5", "the scale index 'x' is not an int"),
    ("digits-var:prune=3:0.5+3:0.2", "scale 3 is given twice"),
    ("digits-var:vs=nope", "vs='nope' is not one of"),
    ("digits-var:draw=gumbel", "draw='gumbel': 'gumbel' is not one of multinomial, inverse_cdf; expected "
                               "draw=multinomial|inverse_cdf"),
    ("digits-var8:draft_steps=3", "'draft_steps' is not an option of digits-var8 (a var model)"),
    ("digits-code8:draft_steps=x", "draft_steps='x': not an int; expected draft_steps=N"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_configs_name_the_key_and_the_allowed_values(text, message):
    with pytest.raises(ValueError) as e:
        parse_config(text)
    assert message in str(e.value) and repr(text) in str(e.value)


@pytest.mark.parametrize("text, message", BAD[:4] + [
    ("digits-var:cfg_skip=9", "cfg_skip must be an int in [0, 3]"),  # ranges: the sampler's own checks
    ("digits-var:prune=7:0.5", "scale index in [0, 3]"),
    ("digits-var:prune=-1:0.5+3:0.5", "two indices name scale 3"),
    ("digits-code8:draft_steps=6", "draft_steps must be in [1, 5] for 6 scales, got 6"),
])
def test_cli_bad_configs_are_one_line_errors(text, message, capsys):
    assert main(["eval", "--accel", "digits-var", text, "--per-class", "1", "--batch-size", "10",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("varcore eval: error:") and "\n" not in err and "Traceback" not in err
    assert message in err and text in err


def test_accel_excludes_models(capsys):
    assert main(["eval", "--accel", "digits-var", "--models", "digits-var"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- DigitsSampler
def test_digits_sampler_passes_the_accelerators_through():
    sampler = DigitsSampler("digits-var")
    labels = torch.tensor([1, 4, 7, 9])
    opts = dict(cfg_skip=1, prune={3: 0.5})
    got = sampler.sample(labels, seed=5, **opts)
    var_sampler = VARSampler(sampler.modules.var, sampler.modules.vae)
    direct = var_sampler.sample(4, labels, g_seed=5, cfg=2.0, top_p=0.0, **opts)
    assert torch.equal(got, direct) and not torch.equal(got, sampler.sample(labels, seed=5))
    assert sampler.kv_cache_bytes(4, **opts) == var_sampler.kv_cache_bytes(4, prune={3: 0.5})
    assert sampler.kv_cache_bytes(4, **opts) < sampler.kv_cache_bytes(4) == var_sampler.kv_cache_bytes(4)
    code = DigitsSampler("digits-code")
    m = code.modules
    peak = CoDeSampler(m.drafter, m.refiner, m.draft_steps, m.vae).kv_cache_bytes(4, prune={3: 0.5})["peak"]
    assert code.kv_cache_bytes(4, prune={3: 0.5}) == peak
    keywords = r"digits-var \(var\) takes the accelerator keywords \['cfg_skip', 'prune', 'kv_budget', 'draw'\]"
    with pytest.raises(TypeError, match=keywords):
        sampler.sample(labels, seed=5, sjd=4)
    with pytest.raises(TypeError, match="digits-par"):
        DigitsSampler("digits-par").sample(labels, seed=5, cfg_skip=1)


@pytest.mark.parametrize("name", ["digits-var8", "digits-code8", "digits-raster"])
def test_digits_sampler_passes_the_draw_through(name):
    """``draw`` reaches the model's sampler: the inverse-CDF draw gives the sampler's own inverse-CDF images, not
    the official draw's."""
    sampler, labels = DigitsSampler(name), torch.tensor([0, 3, 8])
    got = sampler.sample(labels, seed=2, draw="inverse_cdf")
    assert torch.equal(got, sampler.sample(labels, seed=2, draw="inverse_cdf"))
    assert not torch.equal(got, sampler.sample(labels, seed=2, draw="multinomial"))
    assert torch.equal(sampler.sample(labels, seed=2, draw="multinomial"), sampler.sample(labels, seed=2))
    if sampler.info.family != "gpt":
        return
    gen = torch.Generator().manual_seed(2)
    direct = PARSampler(sampler.modules.gpt, sampler.modules.vq).sample(labels, cfg_scale=sampler.info.cfg,
                                                                        generator=gen, draw="inverse_cdf")
    assert torch.equal(got, direct.clamp(-1, 1).add(1).mul(0.5))


def test_draft_steps_picks_the_code_split():
    """``draft_steps=N`` samples with CoDe split at N (a sampler per split, built once): the images and KV bytes of
    CoDeSampler(..., N), the model's own split without the option, and bad splits refused by CoDe's own check."""
    sampler, labels = DigitsSampler("digits-code8"), torch.tensor([2, 5, 9])
    m = sampler.modules
    assert m.draft_steps != 3
    got = sampler.sample(labels, seed=4, draft_steps=3, prune={5: 0.5}, draw="inverse_cdf")
    code3 = CoDeSampler(m.drafter, m.refiner, 3, m.vae)
    direct = code3.sample(3, labels, g_seed=4, cfg=sampler.info.cfg, top_p=0.0, prune={5: 0.5}, draw="inverse_cdf")
    assert torch.equal(got, direct)
    assert not torch.equal(got, sampler.sample(labels, seed=4, prune={5: 0.5}, draw="inverse_cdf"))
    assert torch.equal(sampler.sample(labels, seed=4, draft_steps=m.draft_steps), sampler.sample(labels, seed=4))
    assert sampler.kv_cache_bytes(3, draft_steps=3, prune={5: 0.5}) == code3.kv_cache_bytes(3, prune={5: 0.5})["peak"]
    assert sampler.decoding_for({"draft_steps": 3}) == "CoDe N=3" and sampler.decoding_for({}) == sampler.decoding
    assert sampler._sampler_for({"draft_steps": 3})[0] is sampler._sampler_for({"draft_steps": 3})[0]
    for bad, error in ((0, ValueError), (6, ValueError), ("3", TypeError), ([3], TypeError)):
        with pytest.raises(error, match="draft_steps must be"):
            sampler.sample(labels, seed=4, draft_steps=bad)


class _Counter:
    """Counts the model forward calls of every sampler call: VARSampler.forward (one per scale, a CoDe prefill
    once) and PARSampler.step_logits (one per decoding step), recorded per DigitsSampler.sample call."""

    def __init__(self, monkeypatch):
        self.n, self.calls = 0, []
        for cls, name in ((VARSampler, "forward"), (PARSampler, "step_logits")):
            real = getattr(cls, name)
            monkeypatch.setattr(cls, name, self._counting(real))
        real_sample = DigitsSampler.sample

        def sample(this, labels, *args, **kwargs):
            before = self.n
            out = real_sample(this, labels, *args, **kwargs)
            accel = {k: v for k, v in kwargs.items() if k in this.accel_options()}
            self.calls.append((this.name, json.dumps(accel, sort_keys=True), self.n - before, this.forward_passes))
            return out

        monkeypatch.setattr(DigitsSampler, "sample", sample)

    def _counting(self, real):
        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)
        return counted


@pytest.mark.parametrize("name, accel", [("digits-var", {}), ("digits-var", {"cfg_skip": 2, "prune": {3: 0.5}}),
                                         ("digits-code", {"prune": {2: 0.5}}), ("digits-par", {})])
def test_forward_passes_are_the_model_calls(monkeypatch, name, accel):
    counter = _Counter(monkeypatch)
    sampler = DigitsSampler(name)
    sampler.sample([0, 3], seed=1, **accel)
    (_, _, counted, reported), = counter.calls
    assert reported == counted > 0


def test_kv_budget_reaches_the_sampler_and_its_byte_count():
    """kv_budget=-2:0.5 binds to scale 2 of digits-var's 4 scales; the sampler's tokens are those of VARSampler with
    kv_budget={2: 0.5}, and the KV bytes the harness reports shrink by what kv_cache_bytes says."""
    config = parse_config("digits-var:kv_budget=-2:0.5")
    sampler = DigitsSampler("digits-var")
    bound = ACCEL_OPTIONS["kv_budget"].bind(config.options["kv_budget"], sampler.steps)
    assert bound == {2: 0.5}
    assert sampler.kv_cache_bytes(4, kv_budget=bound) < sampler.kv_cache_bytes(4)
    with pytest.raises(ValueError, match="kv_budget"):
        sampler.sample([0], seed=0, kv_budget={3: 0.5})  # the last scale's keys are never read again


def test_sjd_reaches_the_gpt_sampler_and_its_pass_count(monkeypatch):
    """sjd=W: the tokens of PARSampler.sample with sjd=W, and forward_passes the model calls it made (fewer than
    plain decoding's steps on a bundled GPT at this window)."""
    counter = _Counter(monkeypatch)
    sampler = DigitsSampler("digits-raster")
    sampler.sample([1], seed=0, sjd=16)
    (_, _, counted, reported), = counter.calls
    assert reported == counted < sampler.steps
    with pytest.raises(ValueError, match="sjd"):
        sampler.sample([1], seed=0, sjd=0.5)


# ---------------------------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def harness():
    """evaluate_accel on a tiny count, with every model call and every sample call counted."""
    mp = pytest.MonkeyPatch()
    counter = _Counter(mp)
    configs = ["digits-var:prune=-1:0.5,cfg_skip=1", "digits-var:prune=3:1.0", "digits-var",
               "digits-code:cfg_skip=1,vs=digits-var", "digits-code:prune=2:0.5", "digits-par",
               "digits-code:cfg_skip=1"]
    try:
        rows = evaluate_accel(configs, per_class=1, batch_size=4, seed=3, progress=False)
    finally:
        mp.undo()
    return configs, rows, counter.calls


def test_harness_rows(harness):
    configs, rows, _ = harness
    assert [r["config"] for r in rows] == configs
    for r in rows:
        assert tuple(r) == ACCEL_KEYS
        assert set(r["baseline"]) == {"model", *ACCEL_MEASURES} and set(r["vs_baseline"]) == set(ACCEL_MEASURES)
        for m in ACCEL_MEASURES:
            mine, base = r[m], r["baseline"][m]
            if mine is None or base is None:
                assert r["vs_baseline"][m] is None
            else:
                assert r["vs_baseline"][m] == pytest.approx(mine / base)
        assert 0 <= r["class_consistency"] <= 1 and r["frechet"] >= 0 and r["images_per_s"] > 0
    json.dumps(rows)  # the --json rows are plain data
    var_rows = [r for r in rows if r["baseline"]["model"] == "digits-var"]
    # one baseline run per baseline model: every row against digits-var sees the same baseline figures
    assert all(r["baseline"] == var_rows[0]["baseline"] for r in var_rows)
    plain = rows[2]
    assert all(v == 1 for v in plain["vs_baseline"].values() if v is not None)
    assert {m: plain[m] for m in ACCEL_MEASURES} == {m: plain["baseline"][m] for m in ACCEL_MEASURES}


def test_harness_pairs_the_same_labels_and_seeds(harness):
    """prune=3:1.0 keeps every token: the plain sampler's images, so the same quality as its baseline exactly."""
    _, rows, _ = harness
    neutral = rows[1]
    assert neutral["options"] == {"prune": {3: 1.0}}
    assert neutral["class_consistency"] == neutral["baseline"]["class_consistency"]
    assert neutral["frechet"] == neutral["baseline"]["frechet"]


def test_harness_options_kv_and_passes(harness):
    _, rows, calls = harness
    first = rows[0]
    assert first["options"] == {"prune": {3: 0.5}, "cfg_skip": 1}  # -1: the last of digits-var's 4 scales
    sampler = DigitsSampler("digits-var")
    assert first["kv_bytes"] == sampler.kv_cache_bytes(4, prune={3: 0.5}) < first["baseline"]["kv_bytes"]
    code = rows[4]
    assert code["baseline"]["model"] == "digits-code"
    assert code["kv_bytes"] == DigitsSampler("digits-code").kv_cache_bytes(4, prune={2: 0.5})
    assert rows[5]["kv_bytes"] is None and rows[5]["vs_baseline"]["kv_bytes"] is None  # PARSampler has no count
    assert rows[6]["baseline"]["model"] == "digits-code" and rows[3]["baseline"]["model"] == "digits-var"
    assert rows[6]["baseline"] == rows[4]["baseline"]
    # forward passes: what the model calls of every sample call of that configuration counted
    for r in rows:
        key = json.dumps({k: v for k, v in r["options"].items()}, sort_keys=True)
        counted = {c[2] for c in calls if c[0] == r["model"] and c[1] == key}
        assert counted == {r["forward_passes"]}, r["config"]


def test_harness_interleaves_each_group(harness):
    """After the one-image checks, each baseline's group draws batch i with each of its runs in turn, the order
    rotating from batch to batch; 10 images in batches of 4 are 3 batches. A configuration against two baselines
    (digits-code:cfg_skip=1 against digits-var and against digits-code) runs in both groups."""
    _, rows, calls = harness
    runs = [(c[0], c[1]) for c in calls]
    checks = len(rows)
    timed = runs[checks:]
    groups = {"digits-var": [("digits-var", "{}"), ("digits-var", '{"cfg_skip": 1, "prune": {"3": 0.5}}'),
                             ("digits-var", '{"prune": {"3": 1.0}}'), ("digits-code", '{"cfg_skip": 1}')],
              "digits-code": [("digits-code", "{}"), ("digits-code", '{"prune": {"2": 0.5}}'),
                              ("digits-code", '{"cfg_skip": 1}')],  # measured again, against its own baseline
              "digits-par": [("digits-par", "{}")]}
    expected = []
    for keys in groups.values():
        for i in range(3):
            expected += keys[i % len(keys):] + keys[:i % len(keys)]
    assert timed == expected


def test_sweep_configs_parse():
    parsed = [parse_config(c) for c in SWEEP]
    assert len({c.text for c in parsed}) == len(SWEEP) and not any(c.is_baseline for c in parsed)


def test_cli_sweep_and_json(monkeypatch, capsys):
    import varcore.digits.evaluate as evaluate

    monkeypatch.setattr(evaluate, "SWEEP", ("digits-var-small:cfg_skip=1,vs=digits-var",))
    assert main(["eval", "--sweep", "--json", "--per-class", "1", "--batch-size", "10", "--no-progress"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert list(row) == list(ACCEL_KEYS) and row["config"] == "digits-var-small:cfg_skip=1,vs=digits-var"
    assert row["options"] == {"cfg_skip": 1} and row["baseline"]["model"] == "digits-var"
    assert main(["eval", "--accel", "digits-var:cfg_skip=1", "--per-class", "1", "--batch-size", "10",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "x baseline" in text and "digits-var:cfg_skip=1" in text
