"""Request bodies of the HTTP API, validated at the boundary.

Unknown top-level fields are ignored (clients send many vendor extensions), but every field
the server reads is typed, so a wrong type becomes a 400 naming that field instead of a crash
deep in the worker.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---------------------------------------------------------------------------------------------
# OpenAI chat completions


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OAIContentPart(_Loose):
    type: str
    text: str | None = None


class OAIFunctionCall(_Loose):
    name: str
    # OpenAI sends arguments as a JSON *string*; some clients send an object.
    arguments: str | dict[str, Any] = "{}"


class OAIToolCall(_Loose):
    id: str
    type: Literal["function"] = "function"
    function: OAIFunctionCall


class OAIMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[OAIContentPart] | None = None
    name: str | None = None
    tool_calls: list[OAIToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class OAIFunctionDef(_Loose):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OAITool(_Loose):
    type: Literal["function"] = "function"
    function: OAIFunctionDef


class OAINamedFunction(_Loose):
    name: str


class OAIToolChoiceNamed(_Loose):
    type: Literal["function"] = "function"
    function: OAINamedFunction


class OAIStreamOptions(_Loose):
    include_usage: bool = False


class ThinkingSwitch(_Loose):
    """`{"type": "enabled" | "disabled"}` (DeepSeek API style); Anthropic adds budget_tokens."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class ChatCompletionRequest(_Loose):
    model: str
    messages: list[OAIMessage] = Field(min_length=1)
    tools: list[OAITool] | None = None
    tool_choice: Literal["none", "auto", "required"] | OAIToolChoiceNamed | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: OAIStreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    # Thinking control: reasoning_effort "none"/"minimal" or thinking.type = "disabled" or
    # chat_template_kwargs.thinking = false turn it off; "max"/"xhigh" selects think-max.
    reasoning_effort: str | None = None
    thinking: ThinkingSwitch | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------
# Anthropic messages


class AnthBlock(_Loose):
    """One content block. Kept as one permissive model: the `type` decides which fields count."""

    type: str
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[AnthBlock] | None = None
    is_error: bool | None = None


class AnthMessage(_Loose):
    role: Literal["user", "assistant"]
    content: str | list[AnthBlock]


class AnthTool(_Loose):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class AnthToolChoice(_Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessagesRequest(_Loose):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthMessage] = Field(min_length=1)
    system: str | list[AnthBlock] | None = None
    tools: list[AnthTool] | None = None
    tool_choice: AnthToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    thinking: ThinkingSwitch | None = None
