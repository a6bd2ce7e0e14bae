"""Compare scored runs of the workflow on the same data sets, row by row.

Completeness measured separately on two runs moves with the rows each run
counts (the expected S/N of an undetected row uses a noise model, and a
variable's template flux depends on which inputs each coadd kept).  This
script fixes the rows: those eligible in the *first* run (image ok, away
from edges and defects, template defined) and their expected S/N there,
and asks of every run which of them it detected.  False positives are
counted per run and by class.

Each data-set directory holds, per run tag, what ``score.py --json
DIR/TAG.json`` writes: ``TAG_matches.csv`` and ``TAG_false_positives.csv``.

Usage::

    python benchmarks/independent/compare.py --tags base,new SET_DIR [SET_DIR ...]
        [--template loo|coadd|clip] [--snr 10 5.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KEY = ["visit", "detector", "id"]


def fixed_rows(base: pd.DataFrame, template: str) -> pd.DataFrame:
    """The base run's eligible rows (``KEY`` and their expected S/N)."""
    ok = base[f"eligible_{template}"].astype(bool) & base["img_ok"].astype(bool)
    return base.loc[ok, KEY + [f"exp_snr_{template}"]].rename(
        columns={f"exp_snr_{template}": "exp_snr"})


def detected(rows: pd.DataFrame, matches: pd.DataFrame) -> pd.Series:
    """Whether each fixed row is matched in ``matches`` (absent rows: not matched)."""
    j = rows.merge(matches[KEY + ["matched"]], on=KEY, how="left")
    return j["matched"].fillna(False).astype(bool).to_numpy()


def compare_set(directory: Path, tags: list[str], template: str, snr_cuts) -> list[dict]:
    """One record per tag: hits and totals at each S/N cut, false positives by class."""
    rows = fixed_rows(pd.read_csv(directory / f"{tags[0]}_matches.csv"), template)
    out = []
    for tag in tags:
        rec = {"set": directory.name, "tag": tag}
        try:
            hit = detected(rows, pd.read_csv(directory / f"{tag}_matches.csv"))
            fp = pd.read_csv(directory / f"{tag}_false_positives.csv")
        except FileNotFoundError:
            out.append(rec | {"missing": True})
            continue
        for cut in snr_cuts:
            sel = rows["exp_snr"].to_numpy() >= cut
            rec[f"hit_{cut:g}"], rec[f"n_{cut:g}"] = int(hit[sel].sum()), int(sel.sum())
        rec["fp"] = len(fp)
        rec["fp_classes"] = fp["fp_class"].value_counts().to_dict() if len(fp) else {}
        out.append(rec)
    return out


def _fmt(rec: dict, snr_cuts) -> str:
    if rec.get("missing"):
        return f"{rec['tag']}: -"
    parts = [f"{rec[f'hit_{c:g}'] / max(rec[f'n_{c:g}'], 1):.3f} ({rec[f'n_{c:g}']})"
             for c in snr_cuts]
    return f"{rec['tag']}: " + " / ".join(parts) + f" / FP {rec['fp']}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sets", nargs="+", type=Path, help="data-set directories")
    ap.add_argument("--tags", required=True,
                    help="comma-separated run tags; the first fixes the rows")
    ap.add_argument("--template", default="loo", choices=["loo", "coadd", "clip"],
                    help="template definition of the expected flux (default: loo, as the workflow)")
    ap.add_argument("--snr", nargs="+", type=float, default=[10.0, 5.5],
                    help="expected-S/N cuts for completeness")
    a = ap.parse_args(argv)
    tags = a.tags.split(",")
    totals, n_total = {t: {} for t in tags}, 0
    print(f"completeness at expected S/N >= {' / '.join(f'{c:g}' for c in a.snr)} "
          f"on the rows of '{tags[0]}' (count), false positives")
    for d in a.sets:
        if not (d / f"{tags[0]}_matches.csv").exists():
            print(f"{d.name}: no {tags[0]}_matches.csv, skipped")
            continue
        recs = compare_set(d, tags, a.template, a.snr)
        print(f"{d.name} | " + " | ".join(_fmt(r, a.snr) for r in recs))
        if any(r.get("missing") for r in recs):
            continue                      # totals only over sets that every run has
        n_total += 1
        for r in recs:
            tot = totals[r["tag"]]
            for k, v in r.items():
                if k.startswith(("hit_", "n_")) or k == "fp":
                    tot[k] = tot.get(k, 0) + v
            for cls, n in r["fp_classes"].items():
                tot.setdefault("classes", {})[cls] = tot.get("classes", {}).get(cls, 0) + n
    cells = [_fmt({"tag": t} | totals[t], a.snr) if totals[t] else f"{t}: -" for t in tags]
    print(f"total over the {n_total} sets that every run has | " + " | ".join(cells))
    for t in tags:
        if totals[t].get("classes"):
            print(f"  {t} false positives by class: {dict(sorted(totals[t]['classes'].items()))}")


if __name__ == "__main__":
    main()
