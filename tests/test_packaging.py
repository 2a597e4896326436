"""A plain (non-editable) install must carry trainers/ and judges/ inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_trainers_and_judges_as_subpackages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = next(tmp_path.glob("nnunet_rndpo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nnunet_rndpo/trainers/rndpo_trainers.py" in names
    assert "nnunet_rndpo/judges/agreement.py" in names and "nnunet_rndpo/judges/base.py" in names
    assert "nnunet_rndpo/objectives.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "nnunet_rndpo = nnunet_rndpo.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # nothing at the top level but the package (no stray 'trainers' or 'judges' packages)
    assert {n.split("/")[0] for n in names if not n.startswith("nnunet_rndpo-")} == {"nnunet_rndpo"}
