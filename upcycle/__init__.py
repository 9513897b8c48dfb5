"""upcycle: continual sparse upcycling of Doge language models.

The Python API mirrors the CLI verbs::

    import upcycle
    upcycle.expand("dense-ckpt/", num_experts=1024, out="moe-ckpt/")
    model = upcycle.load_model("moe-ckpt/")
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "expand": "upcycle.expand",
    "load_model": "upcycle.folder",
    "load_config": "upcycle.folder",
    "save_model": "upcycle.folder",
    "UpcycleError": "upcycle.errors",
    "continue_train": "upcycle.train",
    "TrainConfig": "upcycle.recipe",
    "merge": "upcycle.merge",
    "average": "upcycle.merge",
    "export": "upcycle.export",
    "export_adapter": "upcycle.adapter",
    "load_with_adapter": "upcycle.adapter",
    "quickstart": "upcycle.quickstart",
    "CausalCDMoE": "upcycle.modeling_upcycle_doge",
    "UpcycleDogeForCausalLM": "upcycle.modeling_upcycle_doge",
}

__all__ = sorted(_API)


def _api_member(name: str) -> Any:
    return getattr(importlib.import_module(_API[name]), name)


class _Package(types.ModuleType):
    """Imports API members lazily (``import upcycle`` stays cheap) and keeps ``upcycle.expand``
    (and the other verbs) the function, not the same-named submodule that importing
    ``upcycle.expand`` would otherwise put in its place.
    """

    def __getattribute__(self, name: str) -> Any:
        if name in _API:
            return _api_member(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
