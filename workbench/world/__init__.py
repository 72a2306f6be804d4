"""The miniature multimodal world: concepts, modality generators, encoders, tokenizer, training,
MCUB-mini and the model zoo: its presets (:mod:`~workbench.world.presets`), job scheduler and cache
keys (:mod:`~workbench.world.scheduler`), training recipes (:mod:`~workbench.world.recipes`, DAMC's in
:mod:`~workbench.world.damc`) and the reader of a built zoo (:mod:`~workbench.world.zoo`)."""
from .concepts import CONCEPTS, MODALITIES, PLACEHOLDERS
from .mcub import MCUBRecord, load_modal_input, record_inputs, validate_record
from .training import train_mllm
from .presets import PRESETS, zoo_root
from .recipes import plan_jobs
from .scheduler import Job, build_zoo, register_job_kind
from .zoo import Zoo, ensure_zoo, load_expert, load_tower

__all__ = ["CONCEPTS", "MODALITIES", "PLACEHOLDERS", "MCUBRecord", "load_modal_input", "record_inputs",
           "validate_record", "train_mllm", "PRESETS", "Job", "Zoo", "build_zoo", "ensure_zoo", "load_expert",
           "load_tower", "plan_jobs", "register_job_kind", "zoo_root"]
