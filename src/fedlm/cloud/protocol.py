"""OpenAI wire protocol: the request and response models of the cloud service, apart from the engine.

Only fields with a meaning here are accepted; an unknown or unsupported field is a 400 naming it, so a client
never believes an option took effect when it did not.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 20  # OpenAI's own ceiling for top_logprobs
MAX_STOP_SEQUENCES = 4


def _unicode(value: str) -> str:
    """Text must be Unicode that UTF-8 can carry: JSON lets a client send a lone surrogate ("\\ud800"), which no
    tokenizer reads."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {err.start}") from err
    return value


Text = Annotated[str, AfterValidator(_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_unicode)]


class Strict(BaseModel):
    """A request: unknown fields are refused, and so is a value of the wrong JSON type (no "5" for 5, no 1 for
    true): what the schema says is what is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)


def whole_number(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; so does a request. (Put it after the bounds in `Annotated`, or the
    schema loses them.)"""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def number_only(value: Any) -> Any:
    """Python counts true as 1 and false as 0, so a Literal[0] takes false; JSON Schema does not, nor does a request."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


Count = Annotated[int, Field(ge=0), BeforeValidator(whole_number)]
Zero = Annotated[Literal[0, 0.0], BeforeValidator(number_only)]
TopK = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(whole_number)]
Seed = Annotated[int, BeforeValidator(whole_number)]  # any integer: the generator takes it modulo 2**64


# ---- errors ---------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- shared request fields ------------------------------------------------------------------------------------


class SamplingFields(Strict):
    model: str
    max_tokens: Count | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Annotated[Literal[1], BeforeValidator(number_only)] = 1
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Seed | None = None
    stream: bool = False
    user: str | None = None
    presence_penalty: Zero = 0.0
    frequency_penalty: Zero = 0.0

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])


# ---- /v1/completions ------------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1, max_length=1)]  # one prompt a request
    max_tokens: Count = 16
    logprobs: TopK | None = None
    echo: bool = False
    logprob_start_char: Count | None = Field(
        default=None,
        description="fedlm extension, in the spirit of SGLang's logprob_start_len: with echo, only the prompt tokens "
        "that carry a character at or after this offset are scored; earlier ones come back with null logprobs, and "
        "the model's LM head does not run there. A client that re-sends a growing text asks for the new tail only.",
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        return value[0] if isinstance(value, list) else value


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: TopK | None = Field(
        default=None, description="Candidates per token; applies with logprobs=true only."
    )
    stream_options: StreamOptions | None = None

    def token_budget(self, default: int) -> int:
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return default


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---- /v1/models -----------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fedlm"
    max_model_len: int
    max_top_logprobs: int = MAX_TOP_LOGPROBS


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
