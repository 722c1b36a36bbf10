"""scripts/gardo_toyworld.py without training: every arm's config is valid and differs only in its regulariser,
and the summary's numbers (matched proxy, hacking rate, mean over seeds) are computed as documented."""
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gardo_toyworld.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("gardo_toyworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw):
    base = dict(ink_weight=3.0, aux=["clip"], steps=10, rounds=30, lr=3e-4, clip_range=1e-3, timestep_fraction=0.5,
                inner_epochs=2, kl_weight=0.04, reference_kl_threshold=1e-2, reset_every=15, eval_every=5, eval_prompts=16,
                images_per_prompt=4, gardo_set=[], proxy_steps=0, seeds=[0, 1], arms=["baseline", "gardo"], group_size=4)
    return SimpleNamespace(**{**base, **kw})


def test_every_arm_is_a_valid_config_that_differs_only_in_its_regulariser(exp, tmp_path):
    cfgs = {arm: exp.arm_config(arm, _args(), 1, tmp_path / "proxy", tmp_path / "aux", tmp_path) for arm in exp.ARMS}
    assert cfgs["baseline"].kl_weight == 0 and cfgs["kl"].kl_weight == 0.04
    assert cfgs["baseline"].reward == {"toy_proxy_clip": 1.0, "toy_ink": 3.0} and cfgs["kl"].seed == 1
    assert cfgs["gardo"].adaptive_reference and not cfgs["gardo_fixed_reference"].adaptive_reference
    assert cfgs["gardo"].uncertainty_sign == "proxy_overrates" and cfgs["gardo_code_sign"].uncertainty_sign == "reference_code"
    assert cfgs["gardo"].aux_rewards == ["genft.toyworld.proxy:ToyProxyCLIPScore"]
    assert cfgs["gardo"].diversity_advantage and not cfgs["gardo_no_diversity"].diversity_advantage
    assert cfgs["diversity_only"].diversity_advantage and cfgs["diversity_only"].kl_weight == 0
    assert (cfgs["kl"].prompts_per_round, cfgs["kl"].samples_per_prompt) == (8, 4)
    wide = exp.arm_config("gardo", _args(group_size=8), 0, tmp_path / "proxy", tmp_path / "aux", tmp_path)
    assert (wide.prompts_per_round, wide.samples_per_prompt) == (4, 8)
    shared = ("reward", "learning_rate", "num_rounds", "prompts_per_round", "samples_per_prompt", "clip_range", "eval_rewards")
    for arm, cfg in cfgs.items():
        assert all(getattr(cfg, k) == getattr(cfgs["baseline"], k) for k in shared), arm
        assert "toy_oracle_accuracy" in cfg.eval_rewards


def test_matched_proxy_hacking_rate_and_seed_means(exp):
    pts = [dict(round=0, proxy=2.0, ink=0.1, oracle_accuracy=0.9, diversity=2.0),
           dict(round=5, proxy=2.4, ink=0.2, oracle_accuracy=0.7, diversity=1.6)]
    hit = exp.at_proxy_level(pts, 2.1)  # a quarter of the way from round 0 to round 5
    assert hit["round"] == pytest.approx(1.25) and hit["oracle_accuracy"] == pytest.approx(0.85)
    assert math.isnan(exp.at_proxy_level(pts, 3.0)["round"])
    row = exp.summarise("baseline", 0, pts, 2.1, 12.0)
    assert row["acc_lost_per_proxy"] == pytest.approx(0.5) and row["oracle_acc_at_matched"] == pytest.approx(0.85)
    other = exp.summarise("baseline", 1, [pts[0], {**pts[1], "oracle_accuracy": 0.9}], 2.1, 12.0)
    lines = exp.report([row, other], _args(arms=["baseline"]), 24.0)
    mean_row = next(line for line in lines if line.startswith("| GRPO, no KL"))
    assert "0.800 ± 0.141" in mean_row  # final accuracies 0.7 and 0.9
    assert exp.mean_curve([pts, pts])[1]["proxy"] == pytest.approx(2.4)


def test_equal_proxy_range_average_and_paired_differences(exp):
    pts = [dict(round=0, proxy=2.0, ink=0.1, oracle_accuracy=0.9, diversity=2.0),
           dict(round=10, proxy=3.0, ink=0.3, oracle_accuracy=0.5, diversity=1.0)]
    # linear in proxy, so the average over [2, 2.5] is the value at 2.25
    shared = exp.over_proxy_range(pts, 2.0, 2.5)
    assert shared["oracle_accuracy"] == pytest.approx(0.8) and shared["diversity"] == pytest.approx(1.75)
    assert exp.over_proxy_range(pts, 2.0, 2.0)["oracle_accuracy"] == pytest.approx(0.9)
    better = [pts[0], {**pts[1], "oracle_accuracy": 0.7, "diversity": 1.4}]
    rows = [exp.summarise("baseline", s, pts, 2.5, 1.0) for s in (0, 1)]
    rows += [exp.summarise("gardo", 0, better, 2.5, 1.0), exp.summarise("gardo", 1, pts, 2.5, 1.0)]
    assert rows[2]["oracle_acc_over_range"] == pytest.approx(0.85)  # 0.9 − 0.2·0.25
    lines = exp.report(rows, _args(), 4.0)
    paired = next(line for line in lines if line.startswith("| GARDO (GRPO) |") and "(1/2)" in line)
    # final accuracy: +0.2 on seed 0, 0 on seed 1
    assert paired.split(" | ")[1] == "0.100 ± 0.141 (1/2)"


def test_diversity_beyond_ink_fits_a_line_and_reports_residuals(exp):
    line = lambda ink, extra=0.0: dict(round=0, proxy=2.0, ink=ink, oracle_accuracy=0.9, diversity=0.5 - ink + extra)  # noqa: E731
    curves = {"baseline": [[line(0.1), line(0.2, -0.01), line(0.3, -0.01)]],
              "gardo": [[line(0.1), line(0.2, 0.01), line(0.3, 0.01)]]}
    fit = exp.diversity_beyond_ink(curves)
    assert fit["slope"] == pytest.approx(-1.0) and fit["intercept"] == pytest.approx(0.5) and fit["r"] < -0.99
    assert fit["residuals"]["gardo"][0] == pytest.approx(0.01) and fit["residuals"]["baseline"][0] == pytest.approx(-0.01)


def test_proxy_bins_pool_every_evaluation_after_the_start(exp):
    ev = lambda r, proxy, acc, div: dict(round=r, proxy=proxy, ink=0.1, oracle_accuracy=acc, diversity=div)  # noqa: E731
    curves = {"baseline": [[ev(0, 2.05, 0.9, 0.4), ev(5, 2.15, 0.8, 0.3), ev(10, 2.33, 0.5, 0.2)],
                           [ev(0, 2.05, 0.9, 0.4), ev(5, 2.18, 0.6, 0.3)]],
              "gardo": [[ev(0, 2.05, 0.9, 0.4), ev(5, 2.12, 0.9, 0.35)]]}
    bins = exp.by_proxy_bins(curves)
    first = next(b for b in bins if b["low"] == pytest.approx(2.1))
    assert first["arms"]["baseline"]["n"] == 2 and first["arms"]["baseline"]["oracle_accuracy"] == pytest.approx(0.7)
    assert first["arms"]["gardo"]["diversity"] == pytest.approx(0.35)
    last = next(b for b in bins if b["low"] == pytest.approx(2.3))
    assert set(last["arms"]) == {"baseline"} and last["arms"]["baseline"]["oracle_accuracy"] == pytest.approx(0.5)
    assert all(b["low"] >= 2.0 for b in bins) and not any(b["low"] == pytest.approx(2.0) for b in bins)  # round 0 left out
