"""Shared fixtures: the SmolLM2 tokenizer directory and tiny random models (one per family, per session)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

# The test extra installs libtpu and the CUDA plugin (for tests/test_aot.py's deviceless compiles); on a
# machine without a chip they must not make every test probe for one (importing jaxserve pins JAX to the
# CPU there, and the servers the tests start inherit it). A lent GPU/TPU keeps its backend.
import jaxserve  # noqa: E402,F401

# Eight CPU devices for the tensor- and data-parallel tests (tests/test_parallel.py): set before JAX starts
# its backend. Single-device programs run on the first device as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pytest_configure(config):
    # Before JAX compiles anything in this process: the persistent compilation cache is set up once, at
    # the first compilation, so setting it later (as the engine does for the server) would be too late.
    from jaxserve.config import cache_dir

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir() / "xla"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    """The embedded default model's HF directory (fetched and converted once, then cached)."""
    from jaxserve.models.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_gguf_path(smollm2_tokenizer_dir) -> Path:
    """The embedded default model's original GGUF file (in the cache, next to its conversion)."""
    from jaxserve.models.default import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Callable[[str], Path]:
    """tiny_model_dir(family) -> path of a tiny random HF model of that family (written once per session)."""
    from jaxserve.models.testing import make_tiny_model

    made: dict[str, Path] = {}

    def get(family: str = "llama") -> Path:
        if family not in made:
            made[family] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed=0,
                                           tokenizer_dir=smollm2_tokenizer_dir)
        return made[family]

    return get


# One engine shape for every tiny-model engine in the suite: identical programs, so the persistent XLA
# cache (under the jaxserve cache directory) compiles them once per machine, not once per test module.
TINY_ENGINE = dict(max_running_requests=8, max_num_batched_tokens=64, max_model_len=512, page_size=16, num_pages=64)


@pytest.fixture(scope="session")
def tiny_engine_config(tiny_model_dir):
    """tiny_engine_config(family="llama", **overrides) -> EngineConfig of the suite's standard tiny engine."""
    from jaxserve.config import EngineConfig

    def make(family: str = "llama", **overrides):
        return EngineConfig(model=str(tiny_model_dir(family)), **{**TINY_ENGINE, **overrides})

    return make
