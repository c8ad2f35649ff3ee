"""gpu-router: keep priority Ollama models resident on the GPU nodes of a cluster."""

__version__ = "0.1.0"
