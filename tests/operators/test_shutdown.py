"""CLI manners on a real 2-node swarm (HTTP DHT + two node processes): the start banner, and Ctrl-C
(SIGINT) mid-stream: the client's stream ends cleanly, the node withdraws its DHT record at once
(long before its TTL), closes its ledger, logs each step and exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides
from openhydra.testing.wait import wait_until

TTL_S = 300.0  # far longer than the test: a record that disappears was withdrawn, not expired


def peers(dht: DhtProcess, model_id: str) -> list[str]:
    answer = httpx.get(dht.url + "/v1/peers", params={"model_id": model_id}, timeout=5).json()
    return sorted(p["peer_id"] for p in answer["peers"])


@pytest.mark.slow
@pytest.mark.timeout(600)  # 2 nodes + DHT; 94 s at load average 16
def test_ctrl_c_withdraws_ends_streams_and_exits_zero(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    with DhtProcess() as dht:
        nodes = [
            NodeProcess([*swarm_node_overrides(model, dht.url, a, b, tmp_path / name, ttl_s=TTL_S, interval_s=60.0),
                         "privacy=off", f"node.peer_id={name}"], log_path=tmp_path / f"{name}.log")
            for name, a, b in (("head", 0, 4), ("tail", 4, 8))
        ]
        try:
            head, tail = start_all(nodes)
            model_id = model.name
            assert peers(dht, model_id) == ["head", "tail"]

            client = openai.OpenAI(base_url=head.url + "/v1", api_key="unused", timeout=60, max_retries=0)
            outcome: dict = {}

            def chat() -> None:
                pieces = []
                try:
                    stream = client.chat.completions.create(
                        model=model_id, messages=[{"role": "user", "content": "Count for a long time."}],
                        max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            pieces.append(chunk.choices[0].delta.content)
                            outcome.setdefault("first", time.monotonic())
                    outcome["end"] = "finished"
                except openai.APIError as exc:  # an error event, then the end of the stream
                    outcome["end"] = f"error: {exc}"
                outcome["pieces"] = len(pieces)
                outcome["ended_at"] = time.monotonic()

            reader = threading.Thread(target=chat, daemon=True)
            reader.start()
            wait_until(lambda: "first" in outcome or "end" in outcome, 120, 0.05, "the first streamed token")
            assert "first" in outcome, f"no token streamed: {outcome}"
            # Requests that are not streamed, still running at Ctrl-C: a 503 shutting_down each, not a 500 (an
            # operator's probe found 500 internal_error and a traceback in the log)
            answers: dict[str, httpx.Response] = {}
            bodies = {"/v1/chat/completions": {"model": model_id, "max_tokens": 4000, "ignore_eos": True,
                                               "messages": [{"role": "user", "content": "Count."}]},
                      "/api/generate": {"model": model_id, "prompt": "Count.", "stream": False,
                                        "options": {"num_predict": 4000}}}

            def post(path: str) -> None:
                answers[path] = httpx.post(head.url + path, json=bodies[path], timeout=60)

            posters = [threading.Thread(target=post, args=(path,), daemon=True) for path in bodies]
            for poster in posters:
                poster.start()
            wait_until(lambda: _running(head) >= 3, 60, 0.05, "the two unstreamed requests to start")

            sent = time.monotonic()
            head.proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
            reader.join(timeout=30)
            assert not reader.is_alive(), "the client's stream hung after Ctrl-C"
            assert outcome["pieces"] >= 1 and outcome["end"]
            for poster in posters:
                poster.join(timeout=30)
            for path, answer in answers.items():
                assert answer.status_code == 503, (path, answer.status_code, answer.text)
                error = answer.json()["error"]
                code = error["code"] if isinstance(error, dict) else answer.json()["code"]
                assert code == "shutting_down" and "Retry-After" in answer.headers, (path, answer.text)
            assert set(answers) == set(bodies), answers
            if outcome["end"] != "finished":  # cut off: the error event says why, in words a user understands
                assert "shutting down" in outcome["end"], outcome["end"]

            code = head.proc.wait(timeout=45)
            took = time.monotonic() - sent
            assert code == 0, head.log_text()[-3000:]
            assert took < 45
            assert peers(dht, model_id) == ["tail"]  # withdrawn at once; its TTL had ~5 minutes left
            assert not (tmp_path / "head" / "ledger.db-wal").exists()  # the ledger was checkpointed and closed

            log = head.log_text()
            for line in ("OpenHydra node", f"API        {head.url}", "layers [0, 4)", "identity ",
                         "shutting down: withdrawing from the DHT", "withdrew the announcement",
                         "shutdown complete"):
                assert line in log, f"{line!r} not in the log:\n{log[-3000:]}"
            assert "Traceback" not in log
            assert tail.proc.poll() is None  # the other peer keeps running
        finally:
            for node in nodes:
                node.stop()


def _running(node: NodeProcess) -> int:
    """Requests the node is generating for now (its /metrics gauge of active sessions)."""
    for line in httpx.get(node.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("openhydra_active_sessions "):
            return int(float(line.split()[-1]))
    return 0
