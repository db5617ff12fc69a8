"""Wire shapes of the OpenAI-compatible server and how validation failures become 400s."""

import json

import pytest
from pydantic import ValidationError

from chatdistill.serve.errors import APIError, validation_error
from chatdistill.serve.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkDelta,
    CompletionRequest,
)

USER = {"role": "user", "content": "hi"}


def _error_for(model: type, body: dict):
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value.errors())


def test_chat_request_joins_text_content_parts():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        }
    )
    assert req.messages[0].text() == "ab"


def test_chat_request_defaults_follow_openai():
    req = ChatCompletionRequest.model_validate({"messages": [USER]})
    assert (req.temperature, req.top_p, req.n, req.stream) == (1.0, 1.0, 1, False)
    assert req.requested_max_tokens() is None
    assert req.stop_list() == []


def test_max_completion_tokens_wins_and_max_tokens_is_its_alias():
    assert (
        ChatCompletionRequest.model_validate(
            {"messages": [USER], "max_tokens": 7}
        ).requested_max_tokens()
        == 7
    )
    both = {"messages": [USER], "max_tokens": 7, "max_completion_tokens": 7}
    assert ChatCompletionRequest.model_validate(both).requested_max_tokens() == 7
    err = _error_for(ChatCompletionRequest, {**both, "max_completion_tokens": 8})
    assert "disagree" in err.message


def test_stop_accepts_a_string_or_a_list():
    assert ChatCompletionRequest.model_validate({"messages": [USER], "stop": "\n"}).stop_list() == [
        "\n"
    ]
    req = ChatCompletionRequest.model_validate({"messages": [USER], "stop": ["a", "b"]})
    assert req.stop_list() == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'user'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "valid string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "messages.0.content",
            "",
        ),
        ({"messages": [USER], "n": 2}, "n", "only n=1"),
        ({"messages": [USER], "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"messages": [USER], "temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"messages": [USER], "temperature": "0.5"}, "temperature", "valid number"),
        ({"messages": [USER], "top_p": 0}, "top_p", "greater than 0"),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        (
            {"messages": [USER], "max_completion_tokens": -5},
            "max_completion_tokens",
            "greater than",
        ),
        ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"messages": [USER], "stop": ""}, "stop", "empty"),
        ({"messages": [USER], "logprobs": True}, "logprobs", "not supported"),
        ({"messages": [USER], "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"messages": [USER], "tools": []}, "tools", "unrecognized request argument"),
        ({"messages": [USER], "seed": 2**64}, "seed", "less than or equal to"),
        ({"messages": [USER], "seed": -(2**63) - 1}, "seed", "greater than or equal to"),
    ],
)
def test_bad_chat_requests_name_the_field(body, param, words):
    err = _error_for(ChatCompletionRequest, body)
    assert err.status == 400
    assert err.param == param
    assert words in err.message
    assert err.message.startswith(param) or "unrecognized" in err.message


def test_completion_request_takes_a_string_or_token_ids():
    assert CompletionRequest.model_validate({"prompt": "hello"}).max_tokens == 16
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert _error_for(CompletionRequest, {"prompt": ""}).param == "prompt"
    assert _error_for(CompletionRequest, {"prompt": [1.5]}).param.startswith("prompt")
    assert _error_for(CompletionRequest, {}).param == "prompt"


@pytest.mark.parametrize(
    ("model", "body", "where"),
    [
        (CompletionRequest, {"prompt": "\ud800 x"}, "prompt"),
        (CompletionRequest, {"prompt": "hi", "stop": ["a", "b\udfff"]}, "stop.1"),
        (
            ChatCompletionRequest,
            {"messages": [{**USER, "content": "\ud83d"}]},
            "messages.0.content",
        ),
        (ChatCompletionRequest, {"messages": [USER], "model": "a\udfffb"}, "model"),
        (ChatCompletionRequest, {"messages": [USER], "\ud800": 1}, "body"),
    ],
)
def test_lone_surrogates_anywhere_are_a_400_that_says_where(model, body, where):
    err = _error_for(model, body)
    assert err.status == 400
    assert err.message.startswith(f"{where} holds a lone UTF-16 surrogate")
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")  # the answer is valid UTF-8


def test_error_text_echoed_from_the_request_stays_valid_utf8():
    err = APIError(404, "model 'a\udfffb' is not served here", param="x\ud800")
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")
    assert err.message == "model 'a\\udfffb' is not served here" and err.param == "x\\ud800"


def test_validation_error_for_malformed_json_says_so():
    errors = [
        {
            "type": "json_invalid",
            "loc": ("body", 5),
            "msg": "JSON decode error",
            "ctx": {"error": "Expecting value"},
        }
    ]
    err = validation_error(errors)
    assert (err.status, err.code) == (400, "invalid_json")
    assert "not valid JSON: Expecting value" in err.message


def test_error_body_has_the_openai_shape():
    err = _error_for(ChatCompletionRequest, {"messages": [USER], "n": 3})
    body = err.body()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["type"] == "invalid_request_error"


def test_chunk_delta_leaves_unset_fields_out():
    chunk = ChatCompletionChunk(
        id="c", model="m", choices=[ChatChunkChoice(delta=ChunkDelta(content="x"))]
    )
    data = json.loads(chunk.model_dump_json())
    assert data["object"] == "chat.completion.chunk"
    assert data["choices"][0]["delta"] == {"content": "x"}
    assert data["choices"][0]["finish_reason"] is None
