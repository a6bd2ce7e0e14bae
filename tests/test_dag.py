"""Quick checks of the workflow's DAG: the rule graph renders with Graphviz,
and dry-runs on a synthetic 200-visit dataset (no pixels; built by
benchmarks/bench_dag.py) have the expected jobs per rule and open no image."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
#: Rules that exist before any checkpoint has run (from an empty directory).
PRE_CHECKPOINT_RULES = ("simulate", "exposure_index", "skymap", "merge_tables", "all")
CORE_RULES = ("simulate", "exposure_index", "calexp", "skymap", "warp", "coadd", "diff",
              "merge_tables", "all")
N_VISITS = 200


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_dag", ROOT / "benchmarks" / "bench_dag.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_dag", module)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _snakemake(workdir, *args) -> str:
    proc = subprocess.run([bench.SNAKEMAKE, "--snakefile", str(SNAKEFILE), "--cores", "1", *args],
                          cwd=workdir, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _svg_rule_graph(workdir, *config_args) -> str:
    dot = shutil.which("dot")
    if dot is None:
        pytest.skip("Graphviz `dot` is not installed (e.g. apt-get install graphviz)")
    graph = _snakemake(workdir, "--rulegraph", *(("--config", *config_args) if config_args else ()))
    svg = subprocess.run([dot, "-Tsvg"], input=graph, capture_output=True, text=True, timeout=60)
    assert svg.returncode == 0, svg.stderr
    assert svg.stdout.lstrip().startswith(("<?xml", "<svg"))
    return svg.stdout


def _named(svg, rules) -> set[str]:
    return {rule for rule in rules if f">{rule}</text>" in svg}


def test_rulegraph_from_an_empty_directory(tmp_path):
    """Renders, but stops at the checkpoints: the rules behind them (calexp,
    warp, coadd, diff) are unknown to Snakemake until the checkpoints ran."""
    svg = _svg_rule_graph(tmp_path)
    assert _named(svg, PRE_CHECKPOINT_RULES) == set(PRE_CHECKPOINT_RULES)
    assert not (tmp_path / "results").exists()  # drawing the graph ran nothing


#: Known defect, reported to the lead with the fix.

def test_rulegraph_after_the_checkpoints_names_every_rule(tmp_path):
    rules = _snakemake(tmp_path, "--list-rules").split()
    assert set(CORE_RULES) <= set(rules)
    config_args = bench.make_dataset(tmp_path, 20, variant="full", simulated=True)
    svg = _svg_rule_graph(tmp_path, *config_args)
    assert _named(svg, rules) == set(rules)


def test_dry_run_expands_the_full_dag(tmp_path):
    config_args = bench.make_dataset(tmp_path, N_VISITS, variant="full")
    run = bench.dry_run(tmp_path, config_args, snakefile=SNAKEFILE)
    overlaps = pd.read_parquet(tmp_path / "results" / "skymap" / "overlaps.parquet")
    expected = bench.expected_counts(overlaps)
    # every (visit, detector) gets a diff, each included overlap a warp (2 patches x 180
    # visits passing the synthetic seeing cut), each (band, patch) a coadd (2 x 16)
    assert expected == {"warp": 360, "coadd": 32, "diff": N_VISITS, "merge_tables": 1, "all": 1}
    assert {rule: run.counts.get(rule, 0) for rule in expected} == expected
    # both checkpoints and every calexp are complete
    assert not {"exposure_index", "calexp", "skymap"} & set(run.counts)
    assert run.images_opened == 0  # the DAG comes from the cached index, not from headers


def test_dry_run_up_to_the_sky_map(tmp_path):
    config_args = bench.make_dataset(tmp_path, N_VISITS, variant="skymap")
    run = bench.dry_run(tmp_path, config_args, snakefile=SNAKEFILE)
    # the index checkpoint is complete: one calexp per indexed (visit, detector), then the
    # sky map checkpoint; merge_tables and all wait on it
    assert "exposure_index" not in run.counts
    assert {rule: run.counts.get(rule, 0) for rule in ("calexp", "skymap", "merge_tables", "all")} \
        == {"calexp": N_VISITS, "skymap": 1, "merge_tables": 1, "all": 1}
    assert run.images_opened == 0


def test_a_redone_calexp_reruns_the_sky_map(tmp_path):
    config_args = bench.make_dataset(tmp_path, 20, variant="full")
    out = tmp_path / "results"
    newer = (out / "skymap" / "overlaps.parquet").stat().st_mtime_ns + 10**9
    for suffix in ("fits", "sources.parquet", "qa.json"):  # calexp v5 redone after the sky map
        os.utime(out / "calexp" / f"v5-d0.{suffix}", ns=(newer, newer))
    run = bench.dry_run(tmp_path, config_args, snakefile=SNAKEFILE)
    assert run.counts.get("skymap", 0) == 1  # its overlaps/model PSF depend on every calexp


def test_image_audit_counts_an_open(tmp_path):
    """The audit hook used by the dry-runs above does see an image being opened."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "eimage_v1.fits").write_text("")
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text('open("img/eimage_v1.fits").close()\n\nrule all:\n    input: []\n')
    run = bench.dry_run(tmp_path, [], snakefile=snakefile)
    assert run.images_opened == 1
