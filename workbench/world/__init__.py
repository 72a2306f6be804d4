"""The miniature multimodal world: concepts, modality generators, encoders, tokenizer, training,
MCUB-mini and the model zoo (see :mod:`workbench.world.zoo`)."""
from .concepts import CONCEPTS, MODALITIES, PLACEHOLDERS
from .mcub import MCUBRecord, load_modal_input, record_inputs, validate_record
from .training import train_mllm
from .zoo import (PRESETS, Job, Zoo, build_zoo, ensure_zoo, load_expert, load_tower, plan_jobs, register_job_kind,
                  zoo_root)

__all__ = ["CONCEPTS", "MODALITIES", "PLACEHOLDERS", "MCUBRecord", "load_modal_input", "record_inputs",
           "validate_record", "train_mllm", "PRESETS", "Job", "Zoo", "build_zoo", "ensure_zoo", "load_expert", "load_tower",
           "plan_jobs", "register_job_kind", "zoo_root"]
