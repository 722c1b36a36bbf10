"""Dependency direction: genft imports pipelines and reward_models; those two never import genft or each other."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package, forbidden", [("pipelines", ("genft", "reward_models")), ("reward_models", ("genft", "pipelines"))])
def test_package_does_not_import_the_others(package, forbidden):
    code = (
        f"import sys, {package}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"{package} imported {out}"
