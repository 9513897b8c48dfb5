"""upcycle: continual sparse upcycling of Doge language models.

The Python API mirrors the CLI verbs::

    import upcycle
    upcycle.expand("dense-ckpt/", num_experts=1024, out="moe-ckpt/")
    model = upcycle.load_model("moe-ckpt/")
"""

from __future__ import annotations

import importlib
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
    "CausalCDMoE": "upcycle.modeling_upcycle_doge",
    "UpcycleDogeForCausalLM": "upcycle.modeling_upcycle_doge",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Import API members lazily so ``import upcycle`` stays cheap."""
    if name not in _API:
        raise AttributeError(f"module 'upcycle' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
