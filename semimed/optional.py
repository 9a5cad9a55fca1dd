"""Optional packages: a feature whose package is not installed says so in one line, with the extra to install.

The extras (pyproject.toml): `gradcam` (grad-cam: `semimed explain`), `selfsup` (lightly: SimCLR, BYOL),
`classical` (scikit-image: the classical baselines' texture features), `optuna` and `hyperopt` (Ray Tune
searchers), `dicom` (.dcm files); `all` installs every one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from semimed.errors import SemimedError


class MissingPackageError(SemimedError):
    """A feature's optional package (or a codec it needs) is not installed: about this machine, not about the
    file at hand, so the decode cache never records it as a bad image (installing the package must be enough)."""


def missing(feature: str, package: str, extra: str) -> str:
    """The one-line message for `feature` without its optional `package`."""
    return f"{feature} needs the optional package {package}: pip install 'semimed[{extra}]'"


def require(module: str, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """Import `module` (a top-level package's import name), or raise SemimedError naming `feature`, the package
    to install (`package`, default `module`) and the extra that brings it. An error inside an installed
    package (one of its own dependencies missing) is raised as it is: that install is broken, not absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise MissingPackageError(missing(feature, package or module, extra)) from None
