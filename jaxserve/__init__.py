"""jaxserve: an OpenAI-compatible LLM inference server in JAX."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from jaxserve.platforms import default_to_cpu_without_accelerator

default_to_cpu_without_accelerator()  # before anything of jaxserve imports JAX
__all__ = ["LLM", "SamplingParams", "Constraint", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import jaxserve` (e.g. for the CLI's --help) does not pull in JAX.
    if name == "LLM":
        from jaxserve.engine.offline import LLM

        return LLM
    if name in ("SamplingParams", "Constraint"):
        from jaxserve.sampling import params

        return getattr(params, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
