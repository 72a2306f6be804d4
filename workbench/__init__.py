"""mllm-workbench: model composition and merging of multimodal LLMs, tensor by tensor."""
__version__ = "0.1.0"

from .console import quiet as _quiet

_quiet()


def merge(config, **kwargs):
    """Merge experts as described by ``config`` (see :func:`workbench.engine.merge`)."""
    from .engine import merge as _merge

    return _merge(config, **kwargs)


__all__ = ["__version__", "merge"]
