"""The conda env file (envs/diffim.yaml) lists exactly pyproject's dependencies."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(spec: str) -> tuple[str, str]:
    name, version = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    return name.lower().replace("_", "-"), version.replace(" ", "")


def test_env_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_normalise(s) for s in project["dependencies"])
    env = yaml.safe_load((ROOT / "envs" / "diffim.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    have = dict(_normalise(s) for s in conda if not s.startswith(("python", "pip")))
    assert have == wanted
    python = [d for d in conda if d.startswith("python")]
    assert python == ["python" + project["requires-python"]]


def test_env_file_installs_this_package():
    env = yaml.safe_load((ROOT / "envs" / "diffim.yaml").read_text())
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert pip and any(p.strip() in ("-e ../", "-e ..", "../", "..") for p in pip[0])
