"""A quiet console: the few library warnings and progress bars the workbench cannot fix at the call site.

:func:`quiet` is called once when :mod:`workbench` is imported. Everything it hides is named
here, precisely (category, message and the module the warning is attributed to), so a new
warning still shows:

- transformers' ``FutureWarning`` "`past_key_values` is deprecated" (and the same words logged once
  by ``transformers.utils.generic``) comes from the KV-cache calls in :mod:`workbench.mllm`, a
  file hashed into the zoo's cache key (editing it forces a zoo rebuild). PENDING the next zoo
  rebuild: port those calls to ``cache=`` and drop both filters.
- transformers' ``FutureWarning`` "`is_gradient_checkpointing` is deprecated" is raised when
  peft (a dependency, not our code) wraps a model in LoRA adapters; peft will move to
  ``is_activation_checkpointing``.
- transformers' own tqdm bars ("Loading weights") are switched off: in a notebook they freeze at
  0%, and a miniature model loads in milliseconds. The workbench's bars (merges, evaluations)
  are unaffected.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

#: ``(message regex, module regex)`` of the FutureWarnings :func:`quiet` hides.
HIDDEN_FUTURE_WARNINGS: tuple[tuple[str, str], ...] = (
    # workbench/mllm.py (frozen: zoo cache key) passes past_key_values; pending the next zoo rebuild
    (r"`past_key_values` is deprecated", r"torch\.nn\.modules\.module|transformers\..*"),
    # peft reads model.is_gradient_checkpointing when it adds LoRA adapters
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)

#: ``(logger, message start)`` of the log records :func:`quiet` drops.
HIDDEN_LOG_MESSAGES: tuple[tuple[str, str], ...] = (
    # workbench/mllm.py (frozen: zoo cache key) passes past_key_values; pending the next zoo rebuild
    ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet() -> None:
    """Install the filters of :data:`HIDDEN_FUTURE_WARNINGS` and :data:`HIDDEN_LOG_MESSAGES` (once)
    and switch transformers' bars off."""
    for message, module in HIDDEN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)
    for name, start in HIDDEN_LOG_MESSAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # already imported: switch its bars off directly
        hf_logging.disable_progress_bar()
