"""A quiet console: the few library warnings and progress bars the workbench cannot fix at the call site.

:func:`quiet` is called once when :mod:`workbench` is imported. Everything it hides is named
here, precisely (category, message and the module the warning is attributed to), so a new
warning still shows:

- transformers' ``FutureWarning`` "`is_gradient_checkpointing` is deprecated" is raised when
  peft (a dependency, not our code) wraps a model in LoRA adapters; peft will move to
  ``is_activation_checkpointing``.
- transformers' own tqdm bars ("Loading weights") are switched off: in a notebook they freeze at
  0%, and a miniature model loads in milliseconds. The workbench's bars (merges, evaluations)
  are unaffected.
"""
from __future__ import annotations

import os
import sys
import warnings

#: ``(message regex, module regex)`` of the FutureWarnings :func:`quiet` hides.
HIDDEN_FUTURE_WARNINGS: tuple[tuple[str, str], ...] = (
    # peft reads model.is_gradient_checkpointing when it adds LoRA adapters
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
)


def quiet() -> None:
    """Install the filters of :data:`HIDDEN_FUTURE_WARNINGS` and switch transformers' bars off."""
    for message, module in HIDDEN_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning, module=module)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # already imported: switch its bars off directly
        hf_logging.disable_progress_bar()
