"""Checkpoint I/O: lazy readers, LoRA adapters, the atomic sharded writer, name filters."""
from .filters import DEFAULT_KEEP, NameFilter
from .lora import LoraAdapter, is_lora_adapter, peft_key_to_base
from .reader import CheckpointReader, TensorInfo, check_finite, checkpoint_files, read_safetensors_header
from .writer import CheckpointWriter, parse_size

__all__ = [
    "CheckpointReader", "CheckpointWriter", "DEFAULT_KEEP", "LoraAdapter", "NameFilter", "TensorInfo",
    "check_finite", "checkpoint_files", "is_lora_adapter", "parse_size", "peft_key_to_base",
    "read_safetensors_header",
]
