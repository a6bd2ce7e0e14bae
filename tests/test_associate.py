"""Tests of diffim.associate on synthetic DIASources with known groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffim.associate import associate

RA0, DEC0 = 53.0, -27.4
ARCSEC = 1.0 / 3600.0
RADIUS = 0.7


def _synthetic(seed=3):
    """Known groups: 6 objects over 8 visits in 2 bands.

    * objects 0-2: isolated, detected in every visit;
    * objects 3 and 4: a close pair 2 x radius apart, both in every visit;
    * object 5: appears only in visit 5.
    Positions are jittered by up to 0.25" (well inside the radius, and less
    than half the pair separation minus the radius so no source can land
    closer to the wrong member).
    """
    rng = np.random.default_rng(seed)
    cosd = np.cos(np.radians(DEC0))
    east = np.array([0.0, 30.0, -25.0, 10.0, 10.0 + 2 * RADIUS, -40.0])
    north = np.array([0.0, 12.0, -30.0, 40.0, 40.0, 5.0])
    rows, sid = [], 1000
    visits = rng.permutation(np.arange(1, 9))          # ids not in time order
    for k, v in enumerate(visits):
        mjd = 60000.0 + 1.5 * k
        band = "gr"[k % 2]
        for obj in range(6):
            if obj == 5 and v != 5:
                continue
            r = rng.uniform(0, 0.25)
            phi = rng.uniform(0, 2 * np.pi)
            e, n = east[obj] + r * np.cos(phi), north[obj] + r * np.sin(phi)
            rows.append({"diaSourceId": sid, "visit": int(v), "detector": 0, "band": band,
                         "midpointMjdTai": mjd, "ra": RA0 + e * ARCSEC / cosd,
                         "dec": DEC0 + n * ARCSEC, "psfFlux": 1000.0 * (obj + 1),
                         "psfFluxErr": 100.0, "snr": 10.0 * (obj + 1), "true": obj})
            sid += 1
    dia = pd.DataFrame(rows)
    return dia.sample(frac=1.0, random_state=seed).reset_index(drop=True)   # shuffled rows


def test_associates_known_groups_exactly():
    dia = _synthetic()
    out, objects = associate(dia.drop(columns="true"), radius_arcsec=RADIUS)
    assert len(objects) == 6
    # one-to-one between true groups and DIAObjects
    pairs = out.assign(true=dia["true"]).groupby("true")["diaObjectId"].nunique()
    assert (pairs == 1).all()
    assert out.groupby("diaObjectId").apply(lambda g: g.assign(t=dia.loc[g.index, "true"])
                                            ["t"].nunique(), include_groups=False).max() == 1
    # at most one source per visit per object
    assert not out.duplicated(["diaObjectId", "visit"]).any()
    counts = objects.set_index("diaObjectId")["nDiaSources"]
    single = out.loc[dia["true"] == 5, "diaObjectId"].iloc[0]
    assert counts[single] == 1 and (counts.drop(single) == 8).all()
    assert set(objects["bands"]) == {"g,r", "g"} or set(objects["bands"]) == {"g,r", "r"}
    assert objects["nDiaSources"].sum() == len(dia)


def test_positions_are_snr_weighted_means():
    dia = _synthetic()
    out, objects = associate(dia.drop(columns="true"), radius_arcsec=RADIUS)
    obj = objects.set_index("diaObjectId")
    for oid, g in out.groupby("diaObjectId"):
        w = (g["psfFlux"] / g["psfFluxErr"]) ** 2
        # small field: a weighted mean of ra/dec equals the unit-vector mean to < 1e-6"
        assert obj.loc[oid, "ra"] == pytest.approx(np.average(g["ra"], weights=w), abs=1e-9)
        assert obj.loc[oid, "dec"] == pytest.approx(np.average(g["dec"], weights=w), abs=1e-9)
        assert obj.loc[oid, "maxAbsSnr"] == g["snr"].abs().max()
        assert obj.loc[oid, "firstMjd"] == g["midpointMjdTai"].min()


def test_ids_are_deterministic_and_in_time_order():
    dia = _synthetic().drop(columns="true")
    a, oa = associate(dia, radius_arcsec=RADIUS)
    b, ob = associate(dia.iloc[::-1].reset_index(drop=True), radius_arcsec=RADIUS)
    key = a.set_index("diaSourceId")["diaObjectId"]
    assert (b.set_index("diaSourceId")["diaObjectId"].loc[key.index] == key).all()
    pd.testing.assert_frame_equal(oa, ob)
    assert oa["diaObjectId"].tolist() == list(range(1, 7))
    assert oa["firstMjd"].is_monotonic_increasing


def test_one_source_per_visit_conflict_resolved_by_distance():
    """Two sources of one visit within the radius of one object: the closer joins it."""
    cosd = np.cos(np.radians(DEC0))
    dia = pd.DataFrame({"diaSourceId": [1, 2, 3], "visit": [1, 2, 2], "band": "r",
                        "midpointMjdTai": [1.0, 2.0, 2.0],
                        "ra": RA0 + np.array([0.0, 0.5, -0.2]) * ARCSEC / cosd,
                        "dec": [DEC0] * 3})
    out, objects = associate(dia, radius_arcsec=RADIUS)
    assert out["diaObjectId"].tolist() == [1, 2, 1]
    assert len(objects) == 2


def test_empty_and_bad_input():
    dia = _synthetic().drop(columns="true").iloc[:0]
    out, objects = associate(dia)
    assert len(out) == 0 and len(objects) == 0 and "diaObjectId" in objects.columns
    with pytest.raises(ValueError, match="radius_arcsec"):
        associate(dia, radius_arcsec=0.0)
    with pytest.raises(ValueError, match="midpointMjdTai"):
        associate(dia.drop(columns="midpointMjdTai"))
