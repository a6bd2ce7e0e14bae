"""Tests of diffim.evaluate against constructed truth (analytic expectations)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffim.evaluate import (completeness_curve, crossing_snr, evaluate_detections,
                             expected_difference_flux, match_to_truth, score, visit_area_deg2)

RA0, DEC0 = 150.0, 2.0
ARCSEC = 1.0 / 3600.0


def _variables(n=12, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.arange(100, 100 + n),
                         "ra": RA0 + rng.uniform(-60, 60, n) * ARCSEC,
                         "dec": DEC0 + rng.uniform(-60, 60, n) * ARCSEC})


def _dataset(seed=1):
    """Visits 1..6 alternating bands g/r; fluxes alternate high/low so |expected| is large."""
    var = _variables(seed=seed)
    visits = pd.DataFrame({"visit": np.arange(1, 7), "band": list("grgrgr"),
                           "ny": 2000, "nx": 2000, "pixel_scale": 0.2})
    rows = []
    for v, band in zip(visits["visit"], visits["band"]):
        for k, i in enumerate(var["id"]):
            level = 5000.0 * (1 + k)
            rows.append({"visit": v, "band": band, "mjd": 60000.0 + v, "id": i,
                         "flux_njy": level * (2.0 if v % 4 in (1, 2) else 1.0)})
    fluxes = pd.DataFrame(rows)
    ci = pd.DataFrame({"band": visits["band"], "patch": "0x0", "visit": visits["visit"],
                       "detector": 0, "included": visits["visit"] <= 4,
                       "weight": np.where(visits["visit"] <= 4, 0.5, 0.0), "reason": ""})
    exp = expected_difference_flux(fluxes, ci).merge(var, on="id")
    exp["noise_njy"] = 100.0
    return var, visits, fluxes, ci, exp


def _perfect_dia(exp):
    return pd.DataFrame({
        "diaSourceId": np.arange(len(exp), dtype=np.int64) + 1, "visit": exp["visit"],
        "detector": 0, "band": exp["band"], "midpointMjdTai": exp["mjd"],
        "ra": exp["ra"], "dec": exp["dec"], "psfFlux": exp["expected_flux_njy"],
        "psfFluxErr": exp["noise_njy"], "snr": exp["expected_flux_njy"].abs() / 100.0,
        "pixelFlags_edge": False, "pixelFlags_saturated": False, "pixelFlags_bad": False})


def test_expected_flux_analytic():
    """Template = weighted mean over included visits; leave-one-out and coverage."""
    fluxes = pd.DataFrame({"visit": [1, 2, 3], "band": "r", "id": 7,
                           "flux_njy": [100.0, 400.0, 1000.0]})
    ci = pd.DataFrame({"band": "r", "patch": ["0x0", "0x0", "0x0"], "visit": [1, 2, 3],
                       "detector": 0, "included": [True, True, False],
                       "weight": [0.25, 0.75, 0.0], "reason": ["", "", "too broad"]})
    e = expected_difference_flux(fluxes, ci).set_index("visit")
    t = 0.25 * 100 + 0.75 * 400   # 325 nJy, exact arithmetic
    np.testing.assert_allclose(e["template_flux_njy"], t)
    np.testing.assert_allclose(e["expected_flux_njy"], [100 - t, 400 - t, 1000 - t])
    loo = expected_difference_flux(fluxes, ci, leave_one_out=True).set_index("visit")
    # visit 1's template is visit 2 alone and vice versa; visit 3 was never in it
    np.testing.assert_allclose(loo["expected_flux_njy"], [100 - 400, 400 - 100, 1000 - t])
    cov = pd.DataFrame({"visit": [1, 2, 3], "id": 7, "covered": [True, False, True]})
    c = expected_difference_flux(fluxes, ci, cov).set_index("visit")
    np.testing.assert_allclose(c["template_flux_njy"], 100.0)   # only visit 1 saw it
    two = pd.concat([ci, ci.assign(patch="1x0", weight=[0.5, 0.5, 0.0])], ignore_index=True)
    mean = expected_difference_flux(fluxes, two).set_index("visit")   # weights averaged
    np.testing.assert_allclose(mean["template_flux_njy"], (0.375 * 100 + 0.625 * 400))
    own = expected_difference_flux(fluxes, two, source_patches=pd.DataFrame(
        {"id": [7], "patch": ["1x0"]})).set_index("visit")
    np.testing.assert_allclose(own["template_flux_njy"], 250.0)     # patch 1,0's weights
    alone = expected_difference_flux(fluxes.iloc[:1], ci.iloc[:1], leave_one_out=True)
    assert np.isnan(alone["expected_flux_njy"]).all()               # no template input left


def test_match_one_to_one_closest_first():
    truth = pd.DataFrame({"visit": [1, 1], "id": [1, 2], "ra": [RA0, RA0 + 3 * ARCSEC],
                          "dec": [DEC0, DEC0]})
    cosd = np.cos(np.radians(DEC0))
    dia = pd.DataFrame({"diaSourceId": [10, 11, 12], "visit": [1, 1, 2],
                        "ra": [RA0 + 0.5 * ARCSEC / cosd, RA0 + 0.2 * ARCSEC / cosd, RA0],
                        "dec": [DEC0, DEC0, DEC0]})
    m = match_to_truth(dia, truth, radius_arcsec=1.0)
    assert m["diaSourceId"].tolist() == [11, -1]   # the closer one; visit 2 not used
    np.testing.assert_allclose(m["sep_arcsec"].iloc[0], 0.2, atol=1e-6)  # float round-off


def test_perfect_result_scores_perfectly():
    """DIASources exactly at the truth with expected fluxes: completeness 1, no FP."""
    var, visits, fluxes, ci, exp = _dataset()
    assert (exp["expected_flux_njy"].abs() > 1000).all()   # every row is detectable
    s = score(_perfect_dia(exp), exp, None, visits)
    json.dumps(s)                                          # JSON-serializable
    for block in [s["overall"], *s["bands"].values()]:
        c = block["completeness"]
        assert c["n_detected"] == c["n_truth"] > 0
        assert c["at_snr_ge"]["10"] == 1.0
        assert block["false_positives"]["n"] == 0
        assert block["flux"]["bias_median"] == pytest.approx(0.0, abs=1e-12)
        assert block["flux"]["pull_robust_std"] == pytest.approx(0.0, abs=1e-12)
        assert block["astrometry"]["rms_mas"] == pytest.approx(0.0, abs=1e-6)
    assert s["overall"]["n_visits"] == 6


def test_empty_dia_gives_zero_completeness():
    var, visits, fluxes, ci, exp = _dataset()
    empty = _perfect_dia(exp).iloc[:0]
    s = score(empty, exp, None, visits)
    c = s["overall"]["completeness"]
    assert c["n_detected"] == 0 and c["n_truth"] == len(exp)
    assert c["at_snr_ge"]["10"] == 0.0 and c["snr50"] is None
    assert s["overall"]["false_positives"]["per_visit"] == 0.0
    assert s["overall"]["flux"]["bias_median"] is None
    json.dumps(s)


def test_false_positives_counted_and_split_by_bright_stars():
    var, visits, fluxes, ci, exp = _dataset()
    dia = _perfect_dia(exp)
    star = pd.DataFrame({"id": [1, 2], "ra": [RA0 + 200 * ARCSEC, RA0 - 200 * ARCSEC],
                         "dec": [DEC0, DEC0], "kind": "star", "g_mag": [15.0, 22.0],
                         "r_mag": [15.0, 22.0]})
    # visit 1 (g): 2 FPs 2" from the bright star, 1 next to the faint one, 1 in the open
    fp = pd.DataFrame({"diaSourceId": [900, 901, 902, 903], "visit": 1, "detector": 0,
                       "band": "g", "midpointMjdTai": 60001.0,
                       "ra": RA0 + np.array([202, 198, -198, 0]) * ARCSEC,
                       "dec": DEC0 + np.array([0, 0, 0, 150]) * ARCSEC, "psfFlux": 500.0,
                       "psfFluxErr": 100.0, "snr": 5.0, "pixelFlags_edge": False,
                       "pixelFlags_saturated": False, "pixelFlags_bad": [True, False, False,
                                                                           False]})
    s = score(pd.concat([dia, fp], ignore_index=True), exp, star, visits,
              bright_star_mag=18.0, bright_star_radius_arcsec=5.0)
    f = s["overall"]["false_positives"]
    area = 6 * visit_area_deg2((2000, 2000), 0.2)
    assert f["n"] == 4 and f["per_visit"] == pytest.approx(4 / 6)
    assert f["per_deg2"] == pytest.approx(4 / area)
    assert f["near_bright_stars"]["n"] == 2 and f["elsewhere"]["n"] == 2
    assert f["unflagged"]["n"] == 3
    assert f["by_visit"]["1"] == 4 and s["bands"]["r"]["false_positives"]["n"] == 0
    assert s["overall"]["completeness"]["at_snr_ge"]["10"] == 1.0   # truth unaffected


def test_crossing_snr_interpolates_in_log_snr():
    # completeness 0 below S/N 4, 1 above 8: the median S/N per bin is 3 and 9
    snr = np.array([3.0, 3.0, 9.0, 9.0])
    curve = completeness_curve(snr, [False, False, True, True], [0, 4, 8, 20])
    assert curve["completeness"] == [0.0, None, 1.0]
    assert crossing_snr(curve) == pytest.approx(np.sqrt(27.0))   # geometric midpoint
    assert crossing_snr(completeness_curve(snr, [False] * 4, [0, 4, 8, 20])) is None


def test_noise_fallback_uses_median_dia_error():
    var, visits, fluxes, ci, exp = _dataset()
    truth, _ = evaluate_detections(_perfect_dia(exp).assign(psfFluxErr=50.0),
                                   exp.drop(columns="noise_njy"))
    np.testing.assert_allclose(truth["noise_njy"], 50.0)
    np.testing.assert_allclose(truth["expected_snr"], truth["expected_flux_njy"].abs() / 50.0)


def test_missing_columns_are_reported():
    var, visits, fluxes, ci, exp = _dataset()
    with pytest.raises(ValueError, match="expected_flux_njy"):
        score(_perfect_dia(exp), exp.drop(columns="expected_flux_njy"), None, visits)


def test_evaluation_plots_save_pngs(tmp_path):
    """Smoke test: each plot returns a Figure that saves a non-empty PNG."""
    from matplotlib.figure import Figure

    from diffim import plots

    var, visits, fluxes, ci, exp = _dataset()
    dia = _perfect_dia(exp)
    dia.loc[::3, "ra"] += 5 * ARCSEC                       # some misses and false positives
    exp["forcedFlux"] = exp["expected_flux_njy"] + 100.0 * np.random.default_rng(0).normal(
        size=len(exp))
    exp["forcedFluxErr"] = 100.0
    truth, labelled = evaluate_detections(dia, exp)
    quality = visits.assign(midpointMjdTai=60000.0 + visits["visit"], fwhm_arcsec=0.9,
                            zeropoint=31.9, sky_electrons=400.0, astrometry_rms_arcsec=0.01,
                            n_dia_sources=10, noise_ratio=1.02,
                            status=["ok"] * 5 + ["failed"])
    rng = np.random.default_rng(2)
    figs = {"quality": plots.plot_visit_quality(quality),
            "completeness": plots.plot_completeness(truth),
            "pull": plots.plot_flux_pull(truth),
            "fp": plots.plot_false_positives(labelled, visits),
            "coadd": plots.plot_coadd(rng.normal(size=(300, 200)) + 50.0)}
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 1000, name


def test_robust_std_error_matches_its_sampling_scatter():
    """1.1664 sigma / sqrt(n): over 2000 Gaussian samples of n = 100 the
    scatter of robust_std is measured to ~1.6 %; 8 % allows the finite-n
    correction of the asymptotic formula."""
    from diffim.evaluate import robust_std, robust_std_error
    rng = np.random.default_rng(5)
    samples = rng.normal(0.0, 2.0, size=(2000, 100))
    scatter = np.std([robust_std(s) for s in samples])
    predicted = np.mean([robust_std_error(s) for s in samples])
    assert predicted == pytest.approx(scatter, rel=0.08)
    assert predicted == pytest.approx(1.1664 * 2.0 / 10.0, rel=0.05)


def test_box_weight_sum_flags_mixtures_and_borders():
    """Sources on a coadd whose inputs weigh 0.5, 0.3 and 0.2."""
    from diffim.evaluate import box_weight_sum
    ws = np.ones((60, 60))
    ws[:, 38:] = 0.8           # input 2 dropped right of x = 38 (a defect's band)
    ws[5:15, 5:15] = 0.7       # input 3 dropped over a whole source's box
    got = box_weight_sum(ws, [20, 40, 10, 2, 50], [30, 30, 10, 30, 30], radius=4)
    # complete; a mixture across the PSF (36-44 spans 38); uniform but short
    # (the subset is found by inputs_from_weight_sum); too near the border;
    # wholly inside the dropped band
    np.testing.assert_allclose(got, [1.0, np.nan, 0.7, np.nan, 0.8])


def test_inputs_from_weight_sum_finds_the_one_subset():
    from diffim.evaluate import inputs_from_weight_sum
    w = [0.347879, 0.115164, 0.291342, 0.245616]        # the default run's g inputs
    got = inputs_from_weight_sum(0.2913 + 0.2456, w)     # a coadd pixel without 1 and 3
    assert got.tolist() == [False, False, True, True]
    assert inputs_from_weight_sum(sum(w), w).all()
    assert inputs_from_weight_sum(0.5, [0.25, 0.25, 0.5]) is None   # two subsets match
    assert inputs_from_weight_sum(0.9, w) is None                     # none matches
    assert inputs_from_weight_sum(0.1, np.full(20, 0.05)) is None     # too many to search


def test_restrict_coverage_drops_the_inputs_the_coadd_lost():
    """Three variables on a g coadd of visits 1-3: one complete, one lost visit 2, one mixed."""
    from diffim.evaluate import restrict_coverage
    ci = pd.DataFrame({"band": "g", "patch": "0x0", "visit": [1, 2, 3], "detector": 0,
                       "included": True, "weight": [0.5, 0.3, 0.2], "reason": ""})
    cov = pd.DataFrame({"visit": np.repeat([1, 2, 3], 3), "id": np.tile([7, 8, 9], 3),
                        "covered": True})
    sums = pd.DataFrame({"band": "g", "id": [7, 8, 9], "weight_sum": [1.0, 0.7, np.nan]})
    out, known = restrict_coverage(cov, sums, ci)
    assert known.set_index("id")["template_known"].to_dict() == {7: True, 8: True, 9: False}
    dropped = out[~out["covered"]][["visit", "id"]].values.tolist()
    assert dropped == [[2, 8]]
    fluxes = pd.DataFrame({"visit": [1, 2, 3], "band": "g", "id": 8,
                           "flux_njy": [100.0, 1000.0, 400.0]})
    e = expected_difference_flux(fluxes, ci, out).set_index("visit")
    np.testing.assert_allclose(e["template_flux_njy"], (0.5 * 100 + 0.2 * 400) / 0.7)
    # with the full coverage the template would have held visit 2's bright epoch
    full = expected_difference_flux(fluxes, ci, cov).set_index("visit")
    np.testing.assert_allclose(full["template_flux_njy"], 0.5 * 100 + 0.3 * 1000 + 0.2 * 400)


def test_isolated():
    from diffim.evaluate import isolated
    ra = np.array([10.0, 10.0 + 1.5 / 3600, 10.1, 10.2])
    dec = np.zeros(4)
    assert isolated(ra, dec, 2.0).tolist() == [False, False, True, True]
    assert isolated(ra, dec, 1.0).tolist() == [True, True, True, True]
