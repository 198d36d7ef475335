"""A plug-in package of one module, built and installed into a folder of its own, as a user's package would be
(``pip install --no-deps --target``): the way tests reach meal-cache's entry-point groups from outside."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def install_plugin(folder: Path, module: str, source: str, group: str, entry: str) -> Path:
    """Build package ``module`` (its ``__init__.py`` is ``source``) declaring ``entry`` (``NAME = "module:OBJECT"``)
    under the entry-point group ``group``, install it under ``folder``, and return the folder to put on
    PYTHONPATH."""
    package = folder / "plugin"
    (package / module).mkdir(parents=True)
    (package / module / "__init__.py").write_text(source)
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{module.replace("_", "-")}"\nversion = "0.1"\n'
        f'[project.entry-points."{group}"]\n{entry}\n'
    )
    site = folder / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--no-build-isolation", "--target", str(site), str(package)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert install.returncode == 0, install.stderr
    return site
