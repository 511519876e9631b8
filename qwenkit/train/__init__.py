"""Fine-tuning: conversation data -> (input_ids, labels), LoRA adapters in peft's format, merging.

    from qwenkit.train import load_dataset, collate, apply_lora, save_adapter
    examples, stats = load_dataset("conv.json", tokenizer, max_length=512)
    apply_lora(model, targets="all-linear", r=64, alpha=16, dropout=0.05)
    ...  # train on collate(batch) with lm_loss(model(ids), labels)
    save_adapter(model, "out/", base_model_name="Qwen/Qwen2.5-7B-Instruct")
"""

from ..datasets import IGNORE_INDEX, DataStats, Example, collate, load_dataset
from .lora import LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter, trainable_parameters
from .loss import lm_loss

__all__ = ["IGNORE_INDEX", "DataStats", "Example", "LoRALinear", "apply_lora", "collate", "lm_loss",
           "load_adapter", "load_dataset", "merge_lora", "save_adapter", "trainable_parameters"]
