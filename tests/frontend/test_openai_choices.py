"""n > 1, logprobs, echo and the sampling controls through a real stack, with the official SDK.

One module-scoped stack (nats-server, router, a torch decode worker, frontend: real processes).
"""

from __future__ import annotations

import openai
import pytest

from tests.procs import Stack

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, stack: Stack, **kw: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": PROMPT}], **kw)


def test_n_seeded_choices_are_distinct_and_reproducible(client: openai.OpenAI, stack: Stack) -> None:
    a = chat(client, stack, n=3, seed=11, temperature=1.0, max_tokens=12)
    b = chat(client, stack, n=3, seed=11, temperature=1.0, max_tokens=12)
    one = chat(client, stack, n=1, seed=11, temperature=1.0, max_tokens=12)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts[0] == one.choices[0].message.content  # choice 0 draws from the seed itself
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert a.usage.completion_tokens == 36


def test_n_streamed_carries_each_index(client: openai.OpenAI, stack: Stack) -> None:
    whole = chat(client, stack, n=2, seed=5, temperature=1.0, max_tokens=10)
    parts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    usage = []
    for chunk in chat(client, stack, n=2, seed=5, temperature=1.0, max_tokens=10, stream=True,
                      stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage.append(chunk.usage)
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert parts == {c.index: c.message.content for c in whole.choices}
    assert set(finishes) == {0, 1}
    assert len(usage) == 1 and usage[0].completion_tokens == 20


def test_chat_logprobs_top1_is_the_greedy_token(client: openai.OpenAI, stack: Stack) -> None:
    r = chat(client, stack, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.bytes == list(e.token.encode())
    streamed = []
    for chunk in chat(client, stack, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed += c.logprobs.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completions_logprobs_and_echo(client: openai.OpenAI, stack: Stack) -> None:
    r = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  echo=True)
    c = r.choices[0]
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert c.text.startswith(PROMPT)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, top in zip(lp.tokens[n_prompt:], lp.top_logprobs[n_prompt:], strict=True):
        assert max(top, key=top.get) == tok  # greedy: the chosen token is the most likely one
    plain = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    assert PROMPT + plain.choices[0].text == c.text
    streamed_tokens = []
    for chunk in client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                           logprobs=2, stream=True):
        for ch in chunk.choices:
            if ch.logprobs:
                streamed_tokens += ch.logprobs.tokens
    assert streamed_tokens == plain.choices[0].logprobs.tokens
    text, tokens, token_lps = "", [], []
    for chunk in client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                           logprobs=2, echo=True, stream=True):
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs:
                tokens += ch.logprobs.tokens
                token_lps += ch.logprobs.token_logprobs
    assert text == c.text and tokens == lp.tokens
    assert token_lps[0] is None and token_lps[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_best_of_returns_the_most_likely(client: openai.OpenAI, stack: Stack) -> None:
    r = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3,
                                  n=2, best_of=4, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1]
    every = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3,
                                      n=4, logprobs=0)
    ranked = sorted(every.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    assert [c.text for c in r.choices] == [c.text for c in ranked[:2]]


def test_logit_bias_forces_a_token_and_penalties_are_taken(client: openai.OpenAI, stack: Stack) -> None:
    forced = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                       logit_bias={"42": 100})
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 4 and len(set(tokens)) == 1
    echoed = client.completions.create(model=stack.model, prompt=[42], max_tokens=1, echo=True, logprobs=0)
    assert echoed.choices[0].logprobs.tokens[0] == tokens[0]  # it is token 42
    # Penalties reach the engine (their effect is checked against vLLM in tests/engine_vllm/).
    r = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                  frequency_penalty=1.0, presence_penalty=0.5,
                                  extra_body={"repetition_penalty": 1.3, "min_p": 0.1, "top_k": 5})
    assert r.usage.completion_tokens == 4


@pytest.mark.parametrize(("kind", "body", "param"), [
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"n": 17}, "n"),
    ("chat", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("chat", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("completions", {"best_of": 3, "stream": True}, "best_of"),
])
def test_bad_choice_params_are_400_with_param(client: openai.OpenAI, stack: Stack, kind: str, body: dict,
                                              param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if kind == "chat":
            chat(client, stack, max_tokens=2, extra_body=body)
        else:
            client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=2, extra_body=body)
    assert e.value.status_code == 400 and e.value.body["param"] == param  # type: ignore[index]


def test_stop_strings_cut_each_choice_on_its_own(client: openai.OpenAI, stack: Stack) -> None:
    kw = dict(model=stack.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=21, n=2)
    free = {c.index: c.text for c in client.completions.create(**kw).choices}
    stop = free[0][len(free[0]) // 2 : len(free[0]) // 2 + 2]
    assert stop.strip()
    cut = client.completions.create(**kw, stop=[stop])
    by_index = {c.index: c for c in cut.choices}
    for i in (0, 1):
        expected = free[i].split(stop)[0]
        assert by_index[i].text == expected
        assert by_index[i].finish_reason == ("stop" if stop in free[i] else "length")
    assert by_index[0].finish_reason == "stop"
