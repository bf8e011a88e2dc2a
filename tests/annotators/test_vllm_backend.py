"""The ``vllm`` backend: vLLM served here as a subprocess (serial runtime, ``oni-sys annotate``)
or placed on a GPU by Ray (the Ray runtime's annotator actor), and its clear refusals.

The GPU tests serve ``facebook/opt-125m`` (125M parameters, about 250 MB, the model vLLM's own
examples use; its byte-level BPE tokenizer spells " Yes" as one token with its leading space).
vLLM fetches it into the Hugging Face cache on first use; point ``ONI_VLLM_TEST_MODEL`` at a local
path or another model id to use something else.

The CPU tests run a stand-in ``vllm`` executable (a few lines of ``http.server`` answering the
OpenAI routes the backend uses) found on ``PATH``, so the subprocess handling, the Ray placement
and the annotator actor's wiring run for real without a GPU; Ray is told this node has one GPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from oni_sys.annotators import vllm_backend
from oni_sys.annotators.backend_factory import make_backend
from oni_sys.annotators.base import Question
from oni_sys.annotators.vllm_backend import VLLMBackend, VLLMProcess
from oni_sys.config import load_config

VLLM_TEST_MODEL = os.environ.get("ONI_VLLM_TEST_MODEL", "facebook/opt-125m")
ROOT = Path(__file__).resolve().parents[2]

QUESTION = Question(
    prompt="Question: Is the sky blue on a clear day? Answer Yes or No.\nAnswer:",
    choices=(" Yes", " No"),
)

# A stand-in for ``vllm serve MODEL --host H --port P ...``: GET /v1/models names MODEL (and
# says which GPUs it was given); POST /v1/completions answers " Yes" with log-probabilities.
# FAKE_VLLM_EXIT makes it exit at once; FAKE_VLLM_PIDS names a directory it leaves its pid in.
FAKE_VLLM = textwrap.dedent(
    """
    import http.server, json, os, sys

    args = sys.argv[1:]
    assert args[0] == "serve", args
    model, host = args[1], args[args.index("--host") + 1]
    port = int(args[args.index("--port") + 1])
    print("fake vllm serving", model, flush=True)
    if os.environ.get("FAKE_VLLM_EXIT"):
        print("fake vllm: cannot load the model", flush=True)
        sys.exit(3)
    if os.environ.get("FAKE_VLLM_PIDS"):
        with open(os.path.join(os.environ["FAKE_VLLM_PIDS"], str(os.getpid())), "w") as f:
            f.write(" ".join(args))
    TOP = {" Yes": -0.1, " No": -2.4, " A": -0.2, " B": -1.8}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, data, code=200):
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/v1/models":
                return self._send({"error": {"message": "not found"}}, 404)
            cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
            self._send({"object": "list", "data": [{"id": model, "cuda": cuda, "argv": args}]})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1/completions":
                return self._send({"error": {"message": "not found"}}, 404)
            choice = {"text": " Yes", "logprobs": {"top_logprobs": [TOP]}}
            self._send({"object": "text_completion", "model": model, "choices": [choice]})

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
    """
)


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.rstrip(".").count(". ") == 0


def _models(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/models", timeout=5) as resp:
        return json.load(resp)["data"][0]


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _vllm_cfg(*overrides: str):
    return load_config(
        None,
        [
            "annotator.backend=vllm",
            "annotator.model=fake/model",
            "annotator.timeout_s=20",
            *overrides,
        ],
    )


class FakeServer:
    """What VLLMBackend needs of a server, counting stops."""

    def __init__(self, base_url: str = "http://127.0.0.1:9/v1") -> None:
        self.base_url = base_url
        self.stops = 0

    def alive(self) -> bool:
        return self.stops == 0

    def stop(self) -> None:
        self.stops += 1


@pytest.fixture
def fake_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in ``vllm`` first on PATH, vllm pretended installed (here by a patch, in child
    processes such as Ray workers by an empty ``vllm`` package on PYTHONPATH), one pretended
    CUDA GPU; returns the directory the stand-in leaves its pid in."""
    if Path(sys.executable).with_name("vllm").exists():
        pytest.skip("a real vllm executable sits next to this Python and would be used")
    bin_dir, pids, site = tmp_path / "bin", tmp_path / "pids", tmp_path / "site"
    for path in (bin_dir, pids, site / "vllm"):
        path.mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text('"""An empty stand-in for the vllm package."""\n')
    exe = bin_dir / "vllm"
    exe.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{pythonpath}" if pythonpath else str(site))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(pids))
    monkeypatch.setattr(vllm_backend, "_vllm_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "cuda_gpu_count", lambda: 1)
    return pids


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_vllm_served_here_scores_a_question() -> None:
    """No server given: the backend starts ``vllm serve`` as its own subprocess, scores a
    question, and stops vLLM on close."""
    pytest.importorskip("vllm")
    backend = VLLMBackend(
        VLLM_TEST_MODEL,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.3,
        server_args=["--max-model-len", "1024", "--enforce-eager"],
        concurrency=4,
        timeout_s=120,
    )
    try:
        assert isinstance(backend.server, VLLMProcess)
        assert backend.server.base_url.startswith("http://127.0.0.1:")

        async def run():
            try:
                await backend.start()
                return await asyncio.gather(*(backend.score(QUESTION) for _ in range(4)))
            finally:
                await backend.close()  # stops vLLM

        results = asyncio.run(run())
        assert backend.model_id == VLLM_TEST_MODEL
        for result in results:
            assert any(math.isfinite(lp) for lp in result.logprobs), result.meta
            assert math.isclose(sum(result.probabilities()), 1.0)
        assert not backend.server.alive()
    finally:
        backend.server.stop()


@pytest.mark.gpu
def test_vllm_on_a_gpu_ray_actor_scores_a_question() -> None:
    """The Ray runtime's placement: vLLM on a Ray actor holding one GPU, handed to the backend."""
    pytest.importorskip("vllm")
    import ray

    from oni_sys.runtime.vllm_server import RayVLLMServer

    started_ray = not ray.is_initialized()
    server = RayVLLMServer(
        VLLM_TEST_MODEL,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.3,
        extra_args=["--max-model-len", "1024", "--enforce-eager"],
    )
    try:
        backend = VLLMBackend(VLLM_TEST_MODEL, server=server, concurrency=4, timeout_s=120)
        assert backend.server is server and server.base_url.startswith("http://127.0.0.1:")

        async def run():
            try:
                await backend.start()
                return await backend.score(QUESTION)
            finally:
                await backend.close()  # stops vLLM and kills its actor

        result = asyncio.run(run())
        assert any(math.isfinite(lp) for lp in result.logprobs), result.meta
        assert not server.alive()
    finally:
        server.stop()
        if started_ray:
            ray.shutdown()


# ---------------------------------------------------------------- refusals, without Ray

# Runs in a fresh interpreter whose import system refuses Ray and notes every attempt: the
# backend must refuse (no vllm; vllm pretended but no GPU) without ever reaching for Ray.
REFUSE_WITHOUT_RAY = textwrap.dedent(
    """
    import json, sys
    attempts = []

    class BlockRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                attempts.append(name)
                raise ModuleNotFoundError(f"{name} is blocked", name=name)
            return None

    sys.meta_path.insert(0, BlockRay())
    from oni_sys.annotators import vllm_backend
    from oni_sys.annotators.backend_factory import make_backend
    from oni_sys.config import load_config

    cfg = load_config(None, ["annotator.backend=vllm", "annotator.model=some/model"]).annotator
    out = {}
    for case in ("missing", "no_gpu"):
        if case == "no_gpu":
            vllm_backend._vllm_available = lambda: True
            vllm_backend.cuda_gpu_count = lambda: 0
        try:
            make_backend(cfg)
        except Exception as exc:
            out[case] = [type(exc).__name__, str(exc)]
    out["attempts"] = attempts
    out["ray_imported"] = "ray" in sys.modules
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_refusals_name_what_is_missing_and_never_touch_ray() -> None:
    """No vllm package: one sentence naming pip install 'oni-sys[vllm]'. vllm but no GPU: one
    sentence about the GPU. Neither imports (let alone starts) Ray."""
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_WITHOUT_RAY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    kind, message = out["missing"]
    assert kind == "ImportError" and "pip install 'oni-sys[vllm]'" in message, out
    assert _one_sentence(message), message
    kind, message = out["no_gpu"]
    assert kind == "RuntimeError" and "GPU" in message and "found 0" in message, out
    assert _one_sentence(message), message
    assert out["attempts"] == [] and not out["ray_imported"], out


def test_check_counts_the_gpus_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_backend, "_vllm_available", lambda: True)
    vllm_backend.check_vllm_requirements(2, gpus=2)
    with pytest.raises(RuntimeError, match="needs 2 CUDA GPU.*found 1"):
        vllm_backend.check_vllm_requirements(2, gpus=1)


# ------------------------------------------------------------------- a given server


def test_a_given_server_is_used_and_stopped_on_close() -> None:
    server = FakeServer()
    backend = make_backend(_vllm_cfg().annotator, vllm_server=server)
    assert isinstance(backend, VLLMBackend)
    assert backend.server is server and backend.base_url == server.base_url
    assert backend.model_id == "fake/model"
    asyncio.run(backend.close())
    assert server.stops == 1


def test_a_given_server_is_stopped_when_the_backend_cannot_be_built() -> None:
    server = FakeServer()
    with pytest.raises(ValueError, match="concurrency"):
        VLLMBackend("fake/model", server=server, concurrency=0)
    assert server.stops == 1


def test_a_vllm_server_for_another_backend_is_refused() -> None:
    overrides = ["annotator.backend=openai", "annotator.model=m", "annotator.base_url=http://x/v1"]
    cfg = load_config(None, overrides).annotator
    with pytest.raises(ValueError, match="annotator.backend=openai"):
        make_backend(cfg, vllm_server=FakeServer())


# ------------------------------------------------------- the subprocess, with a stand-in


def test_served_here_with_a_stand_in_vllm(fake_vllm: Path) -> None:
    """``vllm serve`` started here: its command line, scoring through it, stopped on close."""
    backend = VLLMBackend("fake/model", gpu_memory_utilization=0.5, server_args=["--x", "1"])
    server = backend.server
    assert isinstance(server, VLLMProcess) and server.alive()
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert _models(server.base_url)["argv"] == [
        "serve",
        "fake/model",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.5",
        "--x",
        "1",
    ]

    async def run():
        try:
            return await backend.score(QUESTION)
        finally:
            await backend.close()

    result = asyncio.run(run())
    assert result.probabilities()[0] > 0.9
    assert not server.alive() and _gone(server.pid())


def test_a_vllm_that_exits_is_reported_with_its_output(
    fake_vllm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_EXIT", "1")
    with pytest.raises(RuntimeError, match="exited with code 3") as failure:
        VLLMProcess.start("fake/model", startup_timeout_s=60)
    assert "cannot load the model" in str(failure.value)


# ------------------------------------------------------ the Ray placement, with a stand-in


@pytest.fixture
def ray_with_a_gpu(fake_vllm: Path) -> Iterator[Path]:
    """A local Ray instance on 127.0.0.1 that believes it has one GPU; its workers find the
    stand-in ``vllm`` (they inherit PATH); shut down at the end."""
    import ray

    from oni_sys.runtime.ray_runtime import _keep_ray_on_loopback

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    _keep_ray_on_loopback()
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield fake_vllm
    finally:
        ray.shutdown()


def test_ray_places_vllm_on_a_gpu_actor_and_its_annotator_uses_it(
    ray_with_a_gpu: Path, tmp_path: Path
) -> None:
    """RayVLLMServer: the actor gets the GPU, vLLM serves on 127.0.0.1, stop() ends both. The
    Ray runtime's annotator actor builds such a server for backend=vllm, asks through it, and
    stops it when closed."""
    import ray

    from oni_sys.runtime.ray_actors import AnnotatorActor
    from oni_sys.runtime.vllm_server import RayVLLMServer

    with pytest.raises(RuntimeError, match=r"needs 2 GPU\(s\) on one Ray node.*has is 1;"):
        RayVLLMServer("fake/model", tensor_parallel_size=2)

    server = RayVLLMServer("fake/model", startup_timeout_s=60)
    pid = ray.get(server._actor.pid.remote())
    assert server.base_url.startswith("http://127.0.0.1:") and server.alive()
    assert _models(server.base_url)["cuda"] == "0"  # the GPU Ray gave the actor
    server.stop()
    server.stop()  # idempotent
    assert not server.alive() and _gone(pid)

    cfg = _vllm_cfg()
    actor = ray.remote(AnnotatorActor).options(num_cpus=0).remote(cfg, str(tmp_path / "l.sqlite"))
    assert ray.get(actor.preflight.remote(), timeout=120) is None  # answered through vLLM
    assert ray.get(actor.version.remote()).startswith("fake/model|")
    (pid_file,) = [p for p in ray_with_a_gpu.iterdir() if int(p.name) != pid]
    ray.get(actor.close.remote(), timeout=120)
    assert _gone(int(pid_file.name))
    ray.kill(actor)


def test_vllm_goes_to_the_node_with_free_gpus_not_the_annotators(
    fake_vllm: Path, ray_cluster
) -> None:
    """On a cluster whose driver node has no GPU, RayVLLMServer reserves the GPU node's GPU
    (a STRICT_PACK placement group), vLLM listens on that node's address (127.0.0.1 here, every
    node being on loopback) and stop() frees the reservation; GPUs already reserved, or more
    GPUs than any node has, are refused with one sentence instead of a wait."""
    import ray
    from ray.util import placement_group_table

    from oni_sys.runtime.vllm_server import RayVLLMServer

    cluster = ray_cluster(num_cpus=1)  # the driver's node: no GPU
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.assert_loopback_only()

    server = RayVLLMServer("fake/model", startup_timeout_s=60, placement_timeout_s=30)
    try:
        assert server.node_id() == gpu_node.node_id != ray.get_runtime_context().get_node_id()
        served = _models(server.base_url)
        assert served["cuda"] == "0"  # the reserved GPU
        host = served["argv"][served["argv"].index("--host") + 1]
        assert host == "127.0.0.1" and server.base_url.startswith(f"http://{host}:")
        pg_id = server._pg.id.hex()
        assert placement_group_table()[pg_id]["strategy"] == "STRICT_PACK"
        assert placement_group_table()[pg_id]["bundles"] == {0: {"GPU": 1.0, "CPU": 1.0}}
        with pytest.raises(RuntimeError) as taken:  # the only GPU is reserved already
            RayVLLMServer("fake/model", placement_timeout_s=1)
        assert "could not reserve 1 GPU and 1 CPU on one node for vllm" in str(taken.value)
        assert "within 1 s" in str(taken.value)
        assert _one_sentence(str(taken.value))
        with pytest.raises(RuntimeError) as too_many:
            RayVLLMServer("fake/model", tensor_parallel_size=2)
        assert _one_sentence(str(too_many.value)) and "the most any live node has is 1" in str(
            too_many.value
        )
    finally:
        server.stop()
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
