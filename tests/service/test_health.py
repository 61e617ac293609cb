"""Liveness, readiness, metrics, request ids, and the operator's view of an exchange."""
import httpx


def test_health_ready_metrics(server, openai_client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": "v1"}
    openai_client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}])
    text = httpx.get(server.url + "/metrics").text
    assert "feedloop_generated_tokens_total" in text and "feedloop_batch_rows_bucket" in text
    assert 'feedloop_http_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_request_id_on_every_response(server):
    r = httpx.get(server.url + "/health")
    assert r.headers["x-request-id"].startswith("req_")
    r = httpx.post(server.url + "/v1/chat/completions", json={}, headers={"x-request-id": "trace-me"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "trace-me"


def test_exchange_view(operator, openai_client):
    r = openai_client.chat.completions.create(model="feedloop", n=2, temperature=0.7, seed=5,
                                              messages=[{"role": "user", "content": "Hello!"}])
    ex = operator.get(f"/v1/admin/exchanges/{r.id}").json()
    assert ex["response_id"] == r.id and ex["model_version_id"] == 1
    assert ex["params"] == {"n": 2, "temperature": 0.7, "top_p": 1.0, "max_tokens": ex["params"]["max_tokens"],
                            "stop": [], "seed": 5, "logprobs": None, "tools": None, "grammar": None}
    assert [c["text"] for c in ex["choices"]] == [c.message.content for c in r.choices]
    assert ex["total_ms"] >= ex["queue_ms"] >= 0
    missing = operator.get("/v1/admin/exchanges/chatcmpl-nope")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
