"""What the API accepts and returns, with examples for the OpenAPI document."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SESSION_EXAMPLE = "k3Jq9v1xQeT0a8ZbW2nLr5sYpD4uGh7c"

# The outside services readiness names (`Outbound.named_states`).
Dependency = Literal["groq", "elevenlabs", "qdrant"]


class SessionCreated(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"session_id": SESSION_EXAMPLE, "created_at": "2026-11-26T10:00:00.000+00:00"}]}
    )

    session_id: str = Field(description="Unguessable id of the new session; keep it to continue the conversation.")
    created_at: str = Field(description="When the session was created (ISO 8601, UTC).")


class SessionMessage(BaseModel):
    role: Literal["user", "assistant"]
    text: str
    at: str = Field(description="When the message was said (ISO 8601, UTC).")
    audio_url: str | None = Field(None, description="The reply as speech, for assistant messages that have it.")


class Session(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": SESSION_EXAMPLE,
                    "created_at": "2026-11-26T10:00:00.000+00:00",
                    "updated_at": "2026-11-26T10:01:12.480+00:00",
                    "messages": [
                        {"role": "user", "text": "My dog Max is ill.", "at": "2026-11-26T10:01:10.102+00:00"},
                        {
                            "role": "assistant",
                            "text": "I'm sorry to hear about Max. How are you holding up?",
                            "at": "2026-11-26T10:01:12.480+00:00",
                            "audio_url": "/api/v1/audio/0f6c2a9e4b7d4c1f8a3e5b2d9c6f1a7e",
                        },
                    ],
                }
            ]
        }
    )

    session_id: str
    created_at: str
    updated_at: str
    messages: list[SessionMessage]


class TextTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "My dog Max is ill."}]})

    text: str = Field(description="What the person says, as text. Not empty; at most APP_MAX_TEXT_CHARS characters.")


class TurnResult(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "turn_id": "8d1f0c3a9b2e4f5d6a7b8c9d0e1f2a3b",
                    "transcript": "My dog Max is ill.",
                    "reply": "I'm sorry to hear about Max. How are you holding up?",
                    "audio_url": "/api/v1/audio/0f6c2a9e4b7d4c1f8a3e5b2d9c6f1a7e",
                    "degraded": [],
                    "timings_ms": {
                        "transcribe": 0.1,
                        "recall": 4.2,
                        "reply": 812.0,
                        "speak": 640.3,
                        "total": 1502.9,
                    },
                }
            ]
        }
    )

    turn_id: str
    transcript: str = Field(description="What the person said: the transcription of a voice turn, or the text.")
    reply: str
    audio_url: str | None = Field(description="The reply as speech; null when speech synthesis was unavailable.")
    degraded: list[str] = Field(
        description="What was skipped because it failed: `memory` (no memories recalled), `speech` (no audio). "
        "What runs after the answer (remembering, summarising) is not reported here. A feature switched off is "
        "not listed."
    )
    timings_ms: dict[str, float] = Field(description="Milliseconds spent in each step up to the answer, and in total.")


class Liveness(BaseModel):
    status: Literal["alive"]


class Features(BaseModel):
    """The feature flags the process started with (APP_FEATURE_*)."""

    memory: bool = Field(description="Long-term memory: recalled and remembered every turn.")
    speech: bool = Field(description="Replies spoken as audio.")
    summaries: bool = Field(description="Long conversations folded into a running summary.")
    api_docs: bool = Field(description="The OpenAPI document and its viewer.")


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "checks": {"database": "up", "memory": "up", "embedder": "up"},
                    "breakers": {"groq": "closed", "elevenlabs": "closed"},
                    "features": {"memory": True, "speech": True, "summaries": True, "api_docs": False},
                }
            ]
        }
    )

    status: Literal["ready", "unavailable"]
    checks: dict[Literal["database", "memory", "embedder"], Literal["up", "down"]] = Field(
        description="A real query on each store in use: `memory` only with long-term memory on; with it, "
        "`embedder`: the embedding model is loaded and the memory store's vectors are of its size."
    )
    breakers: dict[Dependency, Literal["closed", "open", "half_open"]] = Field(
        description="Circuit-breaker state per outside service, by name (`qdrant` only with long-term memory "
        "on a Qdrant server): closed, open or half_open. Never an address: the body is public."
    )
    features: Features


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None
    details: list[dict[str, str]] | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorDetail
