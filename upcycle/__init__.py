"""upcycle: continual sparse upcycling of Doge language models.

The Python API mirrors the CLI verbs::

    import upcycle
    upcycle.expand("dense-ckpt/", num_experts=1024, out="moe-ckpt/")
    model = upcycle.load_model("moe-ckpt/")

Each verb's code lives in a module named after what it does (``upcycle.expansion``,
``upcycle.train``, ``upcycle.merging``, ``upcycle.exporting``, ``upcycle.adapter``,
``upcycle.demo``); no module shares its name with an API function.
"""

from upcycle.adapter import load_with_adapter
from upcycle.demo import quickstart
from upcycle.errors import UpcycleError
from upcycle.expansion import expand
from upcycle.exporting import export, export_adapter
from upcycle.folder import load_config, load_model, save_model
from upcycle.merging import average, merge
from upcycle.modeling_upcycle_doge import CausalCDMoE, UpcycleDogeForCausalLM
from upcycle.recipe import TrainConfig
from upcycle.train import continue_train
from upcycle.version import __version__

__all__ = [
    "CausalCDMoE",
    "TrainConfig",
    "UpcycleDogeForCausalLM",
    "UpcycleError",
    "average",
    "continue_train",
    "expand",
    "export",
    "export_adapter",
    "load_config",
    "load_model",
    "load_with_adapter",
    "merge",
    "quickstart",
    "save_model",
]
