"""/metrics read with prometheus-client's own parser after a known set of requests: each counter's exact
value, histograms that count every generation request, the engine's gauges, and --no-metrics."""

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_live import served

HI = [{"role": "user", "content": "Hello there"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def scrape(url, **headers):
    """Every sample /metrics gives, as prometheus-client parses it."""
    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def value(samples, name, **labels):
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_counters_after_a_known_set_of_requests(engine):
    with served(engine, "tiny", max_tokens=16) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        replies = [client.chat.completions.create(model="tiny", messages=HI, max_tokens=6 + i, temperature=0,
                                                  extra_body=NO_THINK) for i in range(2)]
        streamed = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=NO_THINK)
        usages = [r.usage for r in replies] + [[c for c in streamed][-1].usage]
        ollama_reply = httpx.post(live.url + "/api/chat", json={"model": "tiny", "messages": HI, "stream": False,
                                                                "think": False, "options": {"num_predict": 4}}).json()
        assert httpx.post(live.url + "/v1/chat/completions", json={"model": "nope", "messages": HI}).status_code == 404
        assert httpx.get(live.url + "/no/such/path").status_code == 404
        samples = scrape(live.url)
    requests = "qwen3_mlx_requests_total"
    assert value(samples, requests, route="/v1/chat/completions", model="tiny", status="200") == 3
    assert value(samples, requests, route="/v1/chat/completions", status="404") == 1
    assert value(samples, requests, route="/api/chat", status="200") == 1
    assert value(samples, requests, route="unmatched", status="404") == 1
    assert len([s for s in samples if s.name == requests]) == 4
    prompt = sum(u.prompt_tokens for u in usages) + ollama_reply["prompt_eval_count"]
    generated = sum(u.completion_tokens for u in usages) + ollama_reply["eval_count"]
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert value(samples, "qwen3_mlx_prompt_tokens_total", model="tiny") == prompt
    assert value(samples, "qwen3_mlx_generation_tokens_total", model="tiny") == generated
    assert value(samples, "qwen3_mlx_cached_prompt_tokens_total", model="tiny") >= cached > 0
    hits = sum(1 for u in usages if u.prompt_tokens_details.cached_tokens) + 1  # the Ollama request's too
    assert value(samples, "qwen3_mlx_prefix_hits_total", model="tiny", tier="memory") == hits
    assert value(samples, "qwen3_mlx_time_to_first_token_seconds_count", model="tiny") == 4
    assert value(samples, "qwen3_mlx_time_to_first_token_seconds_bucket", model="tiny", le="+Inf") == 4
    assert value(samples, "qwen3_mlx_time_per_output_token_seconds_count", model="tiny") == 4
    assert value(samples, "qwen3_mlx_speculative_drafted_tokens_total", model="tiny") == 0
    assert value(samples, "qwen3_mlx_running_rows", model="tiny") == 0
    assert value(samples, "qwen3_mlx_queue_length", model="tiny") == 0
    assert value(samples, "qwen3_mlx_memory_limit_bytes", model="tiny") == engine.memory_limit
    assert value(samples, "qwen3_mlx_prefix_store_bytes", model="tiny") > 0


def test_no_metrics_serves_none(engine):
    with served(engine, "tiny", metrics=False) as live:
        response = httpx.get(live.url + "/metrics")
    assert response.status_code == 404


@pytest.mark.parametrize("status", [401, 413])
def test_a_refusal_before_the_route_counts_under_its_route(engine, status):
    with served(engine, "tiny", api_key="k", max_body_bytes=64) as live:
        headers = {} if status == 401 else {"Authorization": "Bearer k"}
        body = {"model": "tiny", "messages": HI * (1 if status == 401 else 20)}
        assert httpx.post(live.url + "/v1/chat/completions", json=body, headers=headers).status_code == status
        samples = scrape(live.url, authorization="Bearer k")
    assert value(samples, "qwen3_mlx_requests_total", route="/v1/chat/completions", status=str(status)) == 1

