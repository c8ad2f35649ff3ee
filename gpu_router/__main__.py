"""Entry point for ``python -m gpu_router``."""

from gpu_router.cli import run

run()
