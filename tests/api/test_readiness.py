"""/readyz tells the truth: 503 while no model can be served (here: a load that fails), and the node
still answers /health and gives typed 503s instead of crashing or pretending to be ready."""

from __future__ import annotations

import time

import httpx

from openhydra.testing.processes import NodeProcess


def test_readyz_is_503_when_the_model_cannot_be_loaded(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')  # no weights
    node = NodeProcess(["model=local", f"model.path={broken}", "hardware=cpu", f"node.data_dir={tmp_path / 'd'}"])
    node.start()
    try:
        deadline = time.monotonic() + 120
        body = {}
        while time.monotonic() < deadline:
            try:
                response = httpx.get(node.url + "/readyz", timeout=2)
                body = response.json()
                if body.get("status") == "failed":
                    break
                assert response.status_code == 503  # loading: not ready yet
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert body.get("status") == "failed" and body.get("error")
        assert httpx.get(node.url + "/readyz").status_code == 503
        assert httpx.get(node.url + "/health").status_code == 200
        chat = httpx.post(node.url + "/v1/chat/completions",
                          json={"model": "broken-model", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert chat.json()["error"]["code"] == "model_load_failed"
    finally:
        node.stop()
