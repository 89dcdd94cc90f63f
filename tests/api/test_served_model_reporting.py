"""A degraded answer names the model that served it, and /api/show tells the source's quantization (issue #15, item 7).

The node starts with no arguments on a machine without the hub, as in test_embedded_default.py: a request
for ``openhydra-qwen3.5-0.8b`` is served by the embedded SmolLM2, so every answer's ``model`` must say
``openhydra-smollm2-135m`` (OpenAI's convention: the response names the model that ran), in chat and text
completions, streamed or not, and in Ollama's routes. SmolLM2 comes from a Q4_1 GGUF, which /api/show
must report as its quantization level, next to the dtype it is served in.
"""

from __future__ import annotations

import gguf
import httpx
import ollama
import openai
import pytest

from openhydra.runtime.source import embedded_gguf_path
from openhydra.testing.processes import NodeProcess

pytestmark = pytest.mark.slow

REQUESTED = "openhydra-qwen3.5-0.8b"
SERVED = "openhydra-smollm2-135m"
MESSAGES = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def degraded_node(smollm2_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("degraded")
    with NodeProcess([f"node.data_dir={data}", "api.rate_limit_requests=100000"], threads=1,
                     env={"HF_HUB_OFFLINE": "1"}) as node:
        yield node


def test_openai_answers_name_the_model_that_served(degraded_node):
    client = openai.OpenAI(base_url=degraded_node.url + "/v1", api_key="x", max_retries=0)
    chat = client.chat.completions.with_raw_response.create(model=REQUESTED, messages=MESSAGES, max_tokens=4)
    assert REQUESTED in chat.headers["X-OpenHydra-Degradation-Reason"]  # the request was degraded ...
    assert chat.parse().model == SERVED  # ... and the body says by what
    chunks = list(client.chat.completions.create(model=REQUESTED, messages=MESSAGES, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and {c.model for c in chunks} == {SERVED}
    text = client.completions.create(model=REQUESTED, prompt="Hello", max_tokens=4)
    assert text.model == SERVED
    streamed = list(client.completions.create(model=REQUESTED, prompt="Hello", max_tokens=4, stream=True))
    assert streamed and {c.model for c in streamed} == {SERVED}
    # asking for the fallback by its own name is no different
    assert client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=2).model == SERVED


def test_ollama_answers_name_the_model_that_served(degraded_node):
    client = ollama.Client(host=degraded_node.url)
    options = {"num_predict": 4}
    assert client.chat(model=REQUESTED, messages=MESSAGES, options=options).model == SERVED
    parts = list(client.chat(model=REQUESTED, messages=MESSAGES, options=options, stream=True))
    assert len(parts) >= 2 and {p.model for p in parts} == {SERVED}
    assert client.generate(model=REQUESTED, prompt="Hello", options=options).model == SERVED
    parts = list(client.generate(model=REQUESTED, prompt="Hello", options=options, stream=True))
    assert {p.model for p in parts} == {SERVED}
    assert client.generate(model=REQUESTED, prompt="").model == SERVED  # the empty "load" answer too
    # the served model named Ollama's way keeps its spelling
    assert client.chat(model=SERVED + ":latest", messages=MESSAGES, options=options).model == SERVED + ":latest"


def test_show_reports_what_is_served_and_the_gguf_quantization_it_came_from(degraded_node):
    """details.quantization_level is what the node serves (a probe: an Ollama user read Q4_1 off a node serving
    bf16), in Ollama's names; the GGUF's own level stays in model_info."""
    reader = gguf.GGUFReader(embedded_gguf_path())  # the file's own header, read by the gguf package
    field = reader.fields["general.file_type"]
    expected = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    assert expected == "Q4_1"
    status = httpx.get(degraded_node.url + "/v1/network/status", timeout=10).json()
    served = {"float32": "F32", "bfloat16": "BF16"}[status["model"]["dtype"]]
    for name in (REQUESTED, SERVED):
        show = ollama.Client(host=degraded_node.url).show(name)
        assert show.details.quantization_level == served
        assert show.details.format == "gguf"
        assert show.modelinfo["openhydra.served_dtype"] == status["model"]["dtype"]
        assert show.modelinfo["openhydra.source_quantization"] == expected
    tags = httpx.get(degraded_node.url + "/api/tags", timeout=10).json()["models"]
    assert {m["details"]["quantization_level"] for m in tags} == {served}


def test_a_node_that_quantized_its_span_reports_that_level():
    from types import SimpleNamespace

    from openhydra.api.routes_ollama import served_level
    from openhydra.api.state import ServedModel
    from openhydra.node import _served_quantization

    def served(quantization: str, dtype: str) -> ServedModel:
        return ServedModel(id="m", aliases=[], source="gguf", family="llama", parameter_count=1, dtype=dtype,
                           context_length=8, num_layers=2, span=(0, 2), quantization="Q4_1",
                           served_quantization=_served_quantization(SimpleNamespace(quantization=quantization)))

    assert served_level(served("int4", "float32")) == "INT4"  # hardware=cpu_int4: int4 weights, fp32 activations
    assert served_level(served("int8", "bfloat16")) == "INT8"
    assert served_level(served("none", "bfloat16")) == "BF16"
    assert served_level(served("none", "float16")) == "F16"
