"""mllm-workbench: model composition and merging of multimodal LLMs, tensor by tensor."""
from importlib.metadata import version as _version

__version__ = _version("mllm-workbench")  # one source: pyproject.toml

from .numerics import pin_cpu_numerics as _pin_cpu_numerics

_pin_cpu_numerics()  # before torch computes: the same numbers on every x86-64 CPU (workbench.numerics)

from .console import quiet as _quiet

_quiet()


def merge(config, **kwargs):
    """Merge experts as described by ``config`` (see :func:`workbench.engine.merge`)."""
    from .engine import merge as _merge

    return _merge(config, **kwargs)


__all__ = ["__version__", "merge"]
