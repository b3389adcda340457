"""What a conversation keeps between turns (checkpointed), and what one turn carries.

Checkpointed: the messages, the running summary and the current turn's results - text
only. The uploaded audio and the services a turn uses travel in the run's context, which
is never checkpointed: audio bytes in the state would grow every checkpoint forever.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    from app.audio import AudioFormat
    from app.memory.store import MemoryStore
    from app.providers.elevenlabs import ElevenLabs
    from app.providers.groq import Groq
    from app.settings import AppSettings
    from app.storage.audio import AudioStore

Degradation = Literal["memory", "speech", "summary"]

TURN_END_MARGIN = 0.25  # seconds a provider call's deadline falls after the turn's end


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
    remembered: NotRequired[bool]  # a new memory was stored
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
    memory: MemoryStore | None  # None: long-term memory is off (APP_FEATURE_MEMORY)
    audio: AudioStore


# A streaming turn's events as they happen: (name, data), docs/app.md#the-streaming-turn.
TurnEvents = Callable[[str, dict[str, Any]], None]


@dataclass
class SpokenReply:
    """A streamed reply's speech, sentence by sentence as it was sent; `failed` once
    synthesis failed (what was sent of it is not kept)."""

    content_type: str
    chunks: list[bytes] = field(default_factory=list)
    failed: bool = False


@dataclass
class TurnContext:
    """Per-run, never checkpointed. `deadline`: the event loop's time when the turn is up.
    `events`: set for a streaming turn, which the steps tell what they have as they have it."""

    services: Services
    deadline: float
    audio: bytes | None = None
    audio_format: AudioFormat | None = None
    events: TurnEvents | None = None
    spoken: SpokenReply | None = None

    def time_for(self, budget: float) -> float:
        """The deadline of a step's provider call, in seconds: its budget, or what is left of
        the turn if that is less. TimeoutError, as the turn's own timeout, when none is left."""
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError
        # A call cut off at the turn's end is the turn's timeout (504, the session as it
        # was), not the provider's failure: its deadline falls a moment later, so that the
        # turn's own timeout always ends it first.
        return min(budget, left + TURN_END_MARGIN)
