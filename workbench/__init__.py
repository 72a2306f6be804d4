"""mllm-workbench: model composition and merging of multimodal LLMs, tensor by tensor."""
__version__ = "0.1.0"
