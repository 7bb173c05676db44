"""Errors in the two wire dialects.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}`; Anthropic clients read
`{"type": "error", "error": {"type", "message"}}`. The official SDKs turn these into typed
exceptions (BadRequestError, AuthenticationError, …) by status code, so the status matters as
much as the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

Dialect = Literal["openai", "anthropic"]

# status -> (OpenAI error type, Anthropic error type)
_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("authentication_error", "authentication_error"),
    404: ("not_found_error", "not_found_error"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


@dataclass
class ApiError(Exception):
    """An error answered to the client with `status`; `param` names the offending field."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self, dialect: Dialect) -> dict[str, Any]:
        oai_type, anth_type = _TYPES.get(self.status, ("server_error", "api_error"))
        if dialect == "anthropic":
            return {"type": "error", "error": {"type": anth_type, "message": self.message}}
        return {
            "error": {
                "message": self.message,
                "type": oai_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation_error(err: ValidationError) -> ApiError:
    """The first problem pydantic found, as one readable line naming the field."""
    first = err.errors(include_url=False)[0]
    # Union members add their type name to the location (`content.str`); drop those so the
    # client sees the field it sent.
    loc = tuple(p for p in first.get("loc", ()) if not (isinstance(p, str) and _is_type_tag(p)))
    param = _loc_to_param(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"missing required field '{param}'"
    elif param:
        message = f"invalid field '{param}': {msg}"
    else:
        message = msg
    return ApiError(400, message, param=param)


def _is_type_tag(part: str) -> bool:
    return (
        part in {"str", "int", "float", "bool", "list", "dict", "none"}
        or (part.startswith(("list[", "dict[", "literal[", "function-", "Literal[")))
        or part[:1].isupper()
    )
