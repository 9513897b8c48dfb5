"""The ``README.md`` model card written by ``upcycle export``: Hub metadata, training summary, usage.

The card is a huggingface_hub :class:`~huggingface_hub.ModelCard`; its metadata is a
:class:`~huggingface_hub.ModelCardData`, so the YAML front matter is what the Hub expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["doge", "moe", "sparse-upcycling", "upcycle", "custom_code"]


@dataclass
class CardInfo:
    """What the card says; ``summary`` is a run's training_summary.json (may be empty)."""

    name: str
    repo: str
    base_model: str | None
    num_experts: int | None
    experts_per_token: int | None
    total_params: int
    summary: dict = field(default_factory=dict)
    license: str = "apache-2.0"
    adapter: bool = False


def metadata(info: CardInfo) -> ModelCardData:
    """The card's Hub metadata (an unset ``base_model`` is left out)."""
    return ModelCardData(license=info.license, base_model=info.base_model, library_name="transformers",
                         pipeline_tag="text-generation", tags=[*TAGS, *(["adapter"] if info.adapter else [])])


def fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def recipe_text(recipe: object) -> object:
    """A run's resolved config (a dict) as one short line; a name stays as is."""
    if not isinstance(recipe, dict):
        return recipe
    keys = ("recipe", "train", "lr", "max_steps", "batch_size", "grad_accum", "seq_len", "warmup", "decay",
            "decay_shape", "weight_decay", "balance_coef", "lora_r")
    shown = [f"{k}={recipe[k]}" for k in keys if recipe.get(k) is not None and not isinstance(recipe[k], (dict, list))]
    return "`" + ", ".join(shown) + "`" if shown else None


def summary_table(info: CardInfo) -> str:
    s = info.summary
    rows = [
        ("experts per layer", info.num_experts or s.get("num_experts")),
        ("experts per token", info.experts_per_token or s.get("experts_per_token")),
        ("trainable parameters", s.get("trainable_params")),
        ("total parameters", s.get("total_params") or info.total_params),
        ("trained", s.get("train")),
        ("tokens seen", s.get("tokens_seen")),
        ("steps", s.get("steps")),
        ("final train loss", s.get("final_train_loss")),
        ("final eval loss", s.get("final_eval_loss")),
        ("recipe", recipe_text(s.get("recipe"))),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def usage(info: CardInfo) -> str:
    if info.adapter:
        return f'''```python
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

adapter = "{info.repo}"
cls = get_class_from_dynamic_module("modeling_upcycle_doge.UpcycleDogeForCausalLM", adapter)
model = cls.from_dense_and_adapter(adapter)  # loads the dense base named in adapter_config.json
tokenizer = AutoTokenizer.from_pretrained(adapter)
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=20)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```'''
    return f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{info.repo}")
model = AutoModelForCausalLM.from_pretrained("{info.repo}", trust_remote_code=True)
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=20)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```'''


def build_card(info: CardInfo) -> ModelCard:
    """The full card: metadata, description, training summary and a usage snippet."""
    base = f" [{info.base_model}](https://huggingface.co/{info.base_model})" if info.base_model else " a dense Doge model"
    what = ("An expert adapter: the CDMoE experts trained on" if info.adapter
            else "A Doge model with CDMoE experts, sparsely upcycled from")
    note = ("`trust_remote_code=True` loads upcycle's causal CDMoE routing (`modeling_upcycle_doge.py`); "
            "without it transformers' own `DogeCDMoE` loads the same weights.")
    if info.adapter:
        note = ("Attach it to the dense base with the code below (no upcycle install needed); "
                "pass `base=` to use a local copy of the base.")
    body = (f"# {info.name}\n\n{what}{base} with upcycle (continual sparse upcycling): the dense weights are "
            f"kept and only the new experts were trained.\n\n## Training summary\n\n{summary_table(info)}\n\n"
            f"## Usage\n\n{usage(info)}\n\n{note}\n")
    return ModelCard(f"---\n{metadata(info).to_yaml()}\n---\n\n{body}")
