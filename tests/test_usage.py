"""The client's reading of a model response's usage block, without either SDK."""

from types import SimpleNamespace

import pytest

from floorguard import Usage, usage_from


def test_openai_chat_completion_as_a_dict():
    response = {"model": "gpt-x", "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}
    assert usage_from(response) == Usage("gpt-x", 12, 30)


def test_openai_responses_and_anthropic_messages_as_objects():
    response = SimpleNamespace(model="claude-x", usage=SimpleNamespace(input_tokens=5, output_tokens=7))
    assert usage_from(response) == Usage("claude-x", 5, 7)
    assert usage_from(response, model="priced-as").model == "priced-as"


def test_a_response_without_usage_is_an_error_not_a_zero():
    with pytest.raises(ValueError):
        usage_from({"model": "m"})
    with pytest.raises(ValueError):
        usage_from({"model": "m", "usage": {"prompt_tokens": 1.5, "completion_tokens": 2}})
