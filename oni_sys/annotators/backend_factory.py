"""Builds the backend that ``annotator.backend`` names from the ``annotator`` config section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from oni_sys.annotators.base import Backend
from oni_sys.config import AnnotatorConfig

if TYPE_CHECKING:
    from oni_sys.annotators.vllm_backend import VLLMServer


def make_backend(cfg: AnnotatorConfig, vllm_server: VLLMServer | None = None) -> Backend:
    """The backend named by ``annotator.backend``.

    Each backend module is imported only when it is chosen, so a run never needs the optional
    packages (llama-cpp-python, vLLM) of the backends it does not use.

    ``vllm_server``: for the vllm backend, a running server to use (and stop on close), such as
    the Ray runtime's GPU-placed one; default: the backend starts ``vllm serve`` here.

    Example::

        cfg = AnnotatorConfig(backend="rules", rules=[{"pattern": "kill", "label": 1}])
        backend = make_backend(cfg)
        scores = await backend.score(build_classification("You kill the newt!", cfg))
        await backend.close()
    """
    if vllm_server is not None and cfg.backend != "vllm":
        raise ValueError(f"a vllm server was given for annotator.backend={cfg.backend}")
    if cfg.backend == "llamacpp":
        from oni_sys.annotators.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(
            cfg.model,
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            niceness=cfg.niceness,
            max_restarts=cfg.max_restarts,
            restart_window_s=cfg.restart_window_s,
        )
    if cfg.backend == "rules":
        from oni_sys.annotators.rules_backend import RulesBackend

        return RulesBackend(cfg.rules)
    if cfg.backend == "openai":
        from oni_sys.annotators.openai_backend import OpenAIBackend

        return OpenAIBackend(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )
    from oni_sys.annotators.vllm_backend import VLLMBackend

    return VLLMBackend(
        cfg.model,
        server=vllm_server,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
    )
