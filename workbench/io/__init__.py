"""Checkpoint I/O: lazy readers, LoRA adapters, experts of every kind, the atomic sharded writer, name filters,
the merge stream's sources and sinks (:mod:`workbench.io.stream`)."""
from .experts import Expert, open_expert
from .filters import DEFAULT_KEEP, NameFilter
from .lora import LoraAdapter, is_lora_adapter, lora_delta, peft_key_to_base
from .reader import CheckpointReader, TensorInfo, check_finite, checkpoint_files, read_safetensors_header
from .writer import CheckpointWriter, atomic_write, parse_size

__all__ = [
    "CheckpointReader", "CheckpointWriter", "DEFAULT_KEEP", "atomic_write", "Expert", "LoraAdapter", "NameFilter", "TensorInfo",
    "check_finite", "checkpoint_files", "is_lora_adapter", "lora_delta", "open_expert", "parse_size", "peft_key_to_base",
    "read_safetensors_header",
]
