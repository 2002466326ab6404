"""Locating the Triton kernels: installed as ``fastnl.kernels`` (setup.py maps the repository's
top-level ``kernels/`` folder there), or loaded from a source checkout that was not installed."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_kernels():
    """Return the ``fastnl.kernels`` module (raises ImportError when triton is not installed)."""
    try:
        return importlib.import_module("fastnl.kernels")
    except ModuleNotFoundError as err:
        if err.name != "fastnl.kernels":
            raise
    init = REPO_ROOT / "kernels" / "__init__.py"
    if not init.is_file():
        raise ImportError("fastnl.kernels is not installed and no kernels/ folder is beside the package")
    spec = importlib.util.spec_from_file_location(
        "fastnl.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastnl.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["fastnl.kernels"]
        raise
    return module
