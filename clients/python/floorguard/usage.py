"""Read the usage block of a model's response without importing any SDK.

OpenAI-style responses carry `usage.prompt_tokens` / `usage.completion_tokens` (chat completions)
or `usage.input_tokens` / `usage.output_tokens` (responses API); Anthropic-style responses carry
`usage.input_tokens` / `usage.output_tokens`. Objects and plain dicts both work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    model: str
    input_tokens: int
    output_tokens: int

    def as_wire(self) -> dict[str, Any]:
        return {"model": self.model, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


def _get(source: Any, name: str) -> Any:
    if isinstance(source, dict):
        return source.get(name)
    return getattr(source, name, None)


def usage_from(response: Any, model: str | None = None) -> Usage:
    """The usage of an OpenAI- or Anthropic-style response (object or dict).

    `model` overrides the response's own `model` field, for a price table keyed differently.
    """
    usage = _get(response, "usage")
    if usage is None:
        raise ValueError("the response has no usage block")
    input_tokens = _get(usage, "input_tokens")
    output_tokens = _get(usage, "output_tokens")
    if input_tokens is None and output_tokens is None:
        input_tokens, output_tokens = _get(usage, "prompt_tokens"), _get(usage, "completion_tokens")
    name = model or _get(response, "model")
    if not isinstance(name, str) or not isinstance(input_tokens, int) or not isinstance(output_tokens, int):
        raise ValueError("the usage block lacks a model or integer token counts")
    return Usage(name, input_tokens, output_tokens or 0)
