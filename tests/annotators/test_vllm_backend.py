"""The ``vllm`` backend: vLLM started on a GPU Ray actor (GPU only) and its clear refusal on CPU.

The GPU test serves ``facebook/opt-125m`` (125M parameters, about 250 MB, the model vLLM's own
examples use; its byte-level BPE tokenizer spells " Yes" as one token with its leading space).
vLLM fetches it into the Hugging Face cache on first use; point ``ONI_VLLM_TEST_MODEL`` at a local
path or another model id to use something else.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os

import pytest

from oni_sys.annotators import vllm_backend
from oni_sys.annotators.base import Question
from oni_sys.annotators.vllm_backend import VLLMBackend, VLLMServer

VLLM_TEST_MODEL = os.environ.get("ONI_VLLM_TEST_MODEL", "facebook/opt-125m")


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.rstrip(".").count(". ") == 0


@pytest.mark.gpu
def test_vllm_server_on_a_gpu_actor_scores_a_question() -> None:
    """Start vLLM on a Ray actor holding one GPU, score a question, stop it."""
    pytest.importorskip("vllm")
    import ray

    started_ray = not ray.is_initialized()
    backend = VLLMBackend(
        VLLM_TEST_MODEL,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.3,
        server_args=["--max-model-len", "1024", "--enforce-eager"],
        concurrency=4,
        timeout_s=120,
    )
    try:
        assert backend.server.base_url.startswith("http://127.0.0.1:")
        question = Question(
            prompt="Question: Is the sky blue on a clear day? Answer Yes or No.\nAnswer:",
            choices=(" Yes", " No"),
        )

        async def run():
            try:
                await backend.start()
                return await asyncio.gather(*(backend.score(question) for _ in range(4)))
            finally:
                await backend.close()  # stops vLLM and kills its actor

        results = asyncio.run(run())
        assert backend.model_id == VLLM_TEST_MODEL
        for result in results:
            assert any(math.isfinite(lp) for lp in result.logprobs), result.meta
            assert math.isclose(sum(result.probabilities()), 1.0)
        assert not backend.server.alive()
    finally:
        backend.server.stop()
        if started_ray:
            ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_without_vllm_the_backend_names_the_extra() -> None:
    """No vllm package: one sentence naming pip install 'oni-sys[vllm]', and Ray is not started."""
    with pytest.raises(ImportError) as failure:
        VLLMBackend(VLLM_TEST_MODEL)
    message = str(failure.value)
    assert "pip install 'oni-sys[vllm]'" in message
    assert _one_sentence(message), message


def test_without_a_gpu_the_server_names_the_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm importable (pretended) but no GPU on this node: one sentence about the GPU."""
    if vllm_backend._local_gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(vllm_backend, "_vllm_available", lambda: True)
    with pytest.raises(RuntimeError) as failure:
        VLLMServer(VLLM_TEST_MODEL, tensor_parallel_size=1)
    message = str(failure.value)
    assert "GPU" in message and "found 0" in message
    assert _one_sentence(message), message
