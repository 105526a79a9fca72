"""The package's public names stay what they are whatever has been imported before."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import bnfold

PUBLIC_CALLABLES = ("fold", "verify", "inspect", "load_model", "save_model")


def test_public_functions_are_not_shadowed_by_subpackages() -> None:
    # A subpackage named like a public function (bnfold/verify/) replaces the function as an
    # attribute of the package on first import; import every module first, in a fresh process so
    # no earlier test has already resolved the lazy names.
    code = (
        "import importlib, pkgutil, bnfold\n"
        "for m in pkgutil.walk_packages(bnfold.__path__, 'bnfold.'):\n"
        "    if not m.name.startswith(('bnfold.torch',)):\n"
        "        importlib.import_module(m.name)\n"
        f"for name in {PUBLIC_CALLABLES!r}:\n"
        "    value = getattr(bnfold, name)\n"
        "    assert callable(value) and not hasattr(value, '__path__'), (name, value)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages(bnfold.__path__, "bnfold."):
        if info.name.startswith(("bnfold.torch",)):
            continue  # torch is an optional extra, imported by its own tests
        importlib.import_module(info.name)
    assert callable(bnfold.verify) and callable(bnfold.fold)
