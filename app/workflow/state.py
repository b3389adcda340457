"""What a conversation keeps between turns (checkpointed), and what one turn carries.

Checkpointed: the messages, the running summary and the current turn's results - text
only. The uploaded audio and the services a turn uses travel in the run's context, which
is never checkpointed: audio bytes in the state would grow every checkpoint forever.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    from app.audio import AudioFormat
    from app.memory.store import MemoryStore
    from app.providers.elevenlabs import ElevenLabs
    from app.providers.groq import Groq
    from app.settings import AppSettings
    from app.storage.audio import AudioStore

Degradation = Literal["memory", "speech", "summary"]


class Message(TypedDict):
    role: Literal["user", "assistant"]
    text: str
    at: str
    turn_id: str
    audio_id: NotRequired[str]


class Turn(TypedDict):
    turn_id: str
    text: NotRequired[str]  # a text turn's input; a voice turn's comes from transcription
    transcript: NotRequired[str]
    memories: NotRequired[list[str]]
    reply: NotRequired[str]
    reply_unavailable: NotRequired[bool]
    retry_after: NotRequired[float]
    audio_id: NotRequired[str]
    degraded: list[Degradation]
    timings_ms: dict[str, float]


class Conversation(TypedDict, total=False):
    session_id: str
    created_at: str
    updated_at: str
    messages: Annotated[list[Message], operator.add]
    summary: str
    summarised: int  # how many of the oldest messages the summary covers
    turn: Turn


@dataclass
class Services:
    settings: AppSettings
    groq: Groq
    elevenlabs: ElevenLabs
    memory: MemoryStore
    audio: AudioStore


@dataclass
class TurnContext:
    """Per-run, never checkpointed."""

    services: Services
    audio: bytes | None = None
    audio_format: AudioFormat | None = None
