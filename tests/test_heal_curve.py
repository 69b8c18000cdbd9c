"""scripts/heal_curve.py's law fit against exact power laws (an independent closed form)."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("heal_curve", Path(__file__).parents[1] / "scripts" / "heal_curve.py")
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)


def test_fit_recovers_an_exact_power_law_and_its_crossing():
    tokens = [5e4, 1e5, 2e5, 5e5, 1e6, 2e6]
    gaps = [2.0 * t ** -0.5 for t in tokens]
    f = C.fit_gap(tokens, gaps)
    assert f["a"] == pytest.approx(math.log(2.0), abs=1e-9) and f["b"] == pytest.approx(0.5, abs=1e-12)
    t = C.tokens_to(f, 1e-3)  # 2 T^-0.5 = 1e-3  <=>  T = (2 / 1e-3)^2 = 4e6
    assert t["tokens"] == pytest.approx(4e6, rel=1e-9)
    lo, hi = t["ci95"]
    assert lo == pytest.approx(4e6, rel=1e-3) and hi == pytest.approx(4e6, rel=1e-3)  # no scatter, no width


def test_noisy_law_gives_an_interval_that_covers_the_truth():
    import numpy as np

    rng = np.random.default_rng(1)
    tokens = np.geomspace(5e4, 2e6, 8)
    gaps = 1.5 * tokens ** -0.3 * np.exp(rng.normal(0, 0.05, len(tokens)))
    f = C.fit_gap(list(tokens), list(gaps))
    truth = (1.5 / 0.02) ** (1 / 0.3)
    t = C.tokens_to(f, 0.02)
    assert t["ci95"][0] < truth < t["ci95"][1] and t["ci95"][1] / t["ci95"][0] > 1.05
    assert f["b"] == pytest.approx(0.3, abs=3 * f["se_b"])


def test_a_gap_that_does_not_fall_has_no_crossing():
    f = C.fit_gap([1e5, 2e5, 4e5], [0.1, 0.12, 0.15])
    assert f["b"] < 0 and C.tokens_to(f, 0.05)["tokens"] is None


def test_measured_crossing_brackets_the_first_point_at_or_below_the_level():
    pts = [(1e5, 2.0), (2e5, 1.6), (5e5, 1.4), (1e6, 1.5), (2e6, 1.2)]
    assert C.crossing(pts, 1.5) == {"reached_by": 5e5, "not_yet_at": 2e5}
    assert C.crossing(pts, 1.3) == {"reached_by": 2e6, "not_yet_at": 1e6}
    assert C.crossing(pts, 1.1) == {"reached_by": None, "not_yet_at": 2e6}
    assert C.crossing(pts, 3.0) == {"reached_by": 1e5, "not_yet_at": None}


def test_a_wikitext_result_with_other_windows_is_refused(tmp_path):
    """The curve pairs its WikiText-2 points with the comparison's (windows of 2048): a file measured with
    another window is never taken for one."""
    import json

    f = tmp_path / "wikitext.json"
    assert C._wikitext_missing(f, 2048)
    f.write_text(json.dumps({"word_perplexity": 30.7, "max_length": None}))
    with pytest.raises(SystemExit, match="windows of the model context tokens, not --wikitext-max-length 2048"):
        C._wikitext_missing(f, 2048)
    f.write_text(json.dumps({"word_perplexity": 34.0, "max_length": 2048}))
    assert not C._wikitext_missing(f, 2048)


def test_the_ratio_law_is_fitted_to_the_log_of_the_ratio():
    """Ratios exp(2 t^-0.3) to the base: the law recovers b = 0.3, and 1.3x falls where 2 t^-0.3 = log 1.3
    (closed form), not where the ratio itself would be log 1.3."""
    pts = [(t, math.exp(2.0 * t ** -0.3)) for t in (1e5, 2e5, 5e5, 1e6, 2e6)] + [(4e6, 0.99)]  # last: below the base
    law = C.ratio_law(pts)
    assert law["points"] == 5 and law["b"] == pytest.approx(0.3, rel=1e-9) and law["a"] == pytest.approx(math.log(2))
    assert C.tokens_to(law, math.log(1.3))["tokens"] == pytest.approx((2.0 / math.log(1.3)) ** (1 / 0.3), rel=1e-6)
    assert C.ratio_law(pts[:2]) is None


@pytest.mark.parametrize("dof, t975", [(1, 12.706), (4, 2.776)])  # Student t 97.5% quantiles (tables)
def test_the_interval_uses_student_t_with_the_fits_degrees_of_freedom(dof, t975):
    """With a exact, log T = (a - log g) / b is monotone in b, so T's interval is b's t interval mapped through:
    b +- t975 * se_b. (1 dof: a Cauchy, whose draws with b <= 0 never cross and sit beyond the upper end.)"""
    b, se_b = 0.3, 0.01
    f = {"a": math.log(0.8), "b": b, "cov": [[0.0, 0.0], [0.0, se_b ** 2]], "dof": dof, "points": dof + 2}
    g = 0.8 * 1e6 ** -b  # crossing at T = 1e6
    r = C.tokens_to(f, g, draws=400_000)
    assert r["tokens"] == pytest.approx(1e6, rel=1e-9)
    lo, hi = r["ci95"]
    b_hi, b_lo = (b * math.log(1e6) / math.log(x) for x in (lo, hi))
    rel = 0.03 if dof == 1 else 0.01  # a Cauchy's 2.5% quantile from 400k draws: about 0.7% standard error
    assert b_lo == pytest.approx(b - t975 * se_b, rel=rel) and b_hi == pytest.approx(b + t975 * se_b, rel=rel)


def test_the_interval_draws_a_and_b_jointly():
    """Against a separate sampler of the same definition (Cholesky factor, one gamma scale per draw for both
    parameters): a and b correlated, both uncertain, 2 dof. In log tokens the 95% interval is about [18.1, 22.0];
    one scale per parameter instead gives about [15.7, 25.0], which this catches (sampling noise: about 0.05)."""
    import numpy as np

    f = {"a": 1.0, "b": 0.2, "cov": [[0.04, 0.0018], [0.0018, 0.0001]], "dof": 2, "points": 4}
    g = 0.05
    r = C.tokens_to(f, g, draws=400_000)
    rng = np.random.default_rng(12345)
    n = 400_000
    z = rng.standard_normal((n, 2)) @ np.linalg.cholesky(np.array(f["cov"])).T
    scale = np.sqrt(f["dof"] / (2.0 * rng.gamma(f["dof"] / 2.0, size=(n, 1))))
    a, b = (np.array([f["a"], f["b"]]) + z * scale).T
    ref = np.sort(np.where(b > 0, (a - math.log(g)) / np.where(b > 0, b, 1.0), np.inf))[[int(0.025 * n), int(0.975 * n)]]
    assert math.log(r["ci95"][0]) == pytest.approx(ref[0], abs=0.15)
    assert math.log(r["ci95"][1]) == pytest.approx(ref[1], abs=0.15)
    assert r["tokens"] == pytest.approx(math.exp((1.0 - math.log(g)) / 0.2), rel=1e-12)


def test_a_crossing_beyond_float_range_is_none_not_infinity():
    assert C._crossing(1.0, 1e-4, 0.05) is None and C._crossing(1.0, -0.1, 0.05) is None
    f = C.fit_gap([1e5, 2e5, 4e5, 8e5], [0.5, 0.4999, 0.4998, 0.4997])  # b ~ 1e-4: the crossing is past 1e300
    r = C.tokens_to(f, 1e-3)
    assert r["tokens"] is None and all(x["tokens"] is None for x in r["leave_one_out"])


@pytest.mark.parametrize("at, why", [("1M,2M", "below the curve's 2000000 tokens"), ("100,1M", "less than one sequence")])
def test_budgets_are_checked_before_the_model_loads(tmp_path, monkeypatch, at, why):
    import json

    (tmp_path / "curve_settings.json").write_text(json.dumps(
        {"model": "no-such-model", "settings": {"tokens": "2M", "precision": "bf16", "checkpoint_every": 50}}))
    monkeypatch.setattr("sys.argv", ["heal_curve.py", "budgets", "--out", str(tmp_path), "--at", at])
    with pytest.raises(SystemExit, match=why):
        C.main()


def test_fit_degrees_of_freedom_and_an_unbounded_interval():
    import numpy as np

    rng = np.random.default_rng(3)
    tokens = [1e5, 2e5, 4e5]
    f = C.fit_gap(tokens, [0.5 * t ** -0.05 * math.exp(rng.normal(0, 0.2)) for t in tokens])
    assert f["dof"] == 1 and f["b"] > 0
    r = C.tokens_to(f, 1e-3)  # a slope this uncertain: many draws never reach the level
    assert r["draws_with_b_above_0"] < 0.975 and r["ci95"][1] is None and r["ci95"][0] is not None


def test_leave_one_out_refits_without_each_point():
    tokens = [5e4, 1e5, 2e5, 5e5, 1e6]
    gaps = [2.0 * t ** -0.5 for t in tokens]
    gaps[2] *= 3.0  # one outlier
    f = C.fit_gap(tokens, gaps)
    loo = C.tokens_to(f, 1e-3)["leave_one_out"]
    assert [x["left_out"] for x in loo] == tokens
    assert loo[2]["tokens"] == pytest.approx(4e6, rel=1e-9)  # without the outlier: the exact law's crossing
    assert all(x["tokens"] != pytest.approx(4e6, rel=1e-3) for i, x in enumerate(loo) if i != 2)
    assert "leave_one_out" not in C.tokens_to(C.fit_gap(tokens[:3], gaps[:3]), 1e-3)
