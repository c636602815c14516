"""Shared fixtures: the SmolLM2 tokenizer directory and tiny random models (one per family, per session)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


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
