"""The package's public names are what the README says they are."""

from __future__ import annotations

import importlib
import pkgutil
import types

import compresscnn as cc


def test_public_names_stay_functions_after_every_submodule_is_imported():
    """Importing a submodule binds it on the package; a submodule named like an exported
    function (``compresscnn.evaluate``) would then replace the function."""
    for info in pkgutil.walk_packages(cc.__path__, "compresscnn."):
        if info.name != "compresscnn.__main__":
            importlib.import_module(info.name)
    for name, home in cc._EXPORTS.items():
        obj = getattr(cc, name)
        assert not isinstance(obj, types.ModuleType), f"cc.{name} is the module {obj.__name__}"
        assert obj is getattr(importlib.import_module(home), name)
    assert callable(cc.evaluate) and callable(cc.finetune)
    assert sorted(cc.__all__) == sorted([*cc._EXPORTS, "__version__"])
