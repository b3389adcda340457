"""The steps of a turn. Each takes the conversation and the run's context and returns the
state updates it makes; a step that depends on an optional service degrades instead of
failing the turn, and says so in the turn's `degraded` list. Each provider call is given
its step's budget, or what is left of the turn if that is less (`TurnContext.time_for`).
A feature switched off (APP_FEATURE_MEMORY, _SPEECH, _SUMMARIES) is a choice, not a
failure: its steps do nothing, call nobody and degrade nothing (docs/app.md#feature-flags).

transcribe -> recall -> reply -> speak -> remember -> summarise
                          \\-> (reply unavailable) end: the user's words are kept

A turn that repeats the kept words (the page's "Try again") is not added a second time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from langgraph.runtime import Runtime

from app.memory.store import MemoryUnavailable
from app.providers.elevenlabs import content_type_of
from app.providers.errors import ProviderError
from app.providers.groq import ChatMessage
from app.workflow import prompts
from app.workflow.sentences import Sentences
from app.workflow.state import Conversation, Degradation, Message, SpokenReply, Turn, TurnContext

# When the language model is down and nobody said when to come back.
DEFAULT_RETRY_AFTER = 5.0
RECALL_FROM_LAST_MESSAGES = 3


class NothingHeard(Exception):
    """The transcription came back empty: there was no speech to answer."""


class TranscriptionFailed(Exception):
    """The transcriber gave no answer: a voice turn cannot go on without its words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def timed(turn: Turn, step: str, started: float, **changes: Any) -> Turn:
    timings = {**turn["timings_ms"], step: round((time.perf_counter() - started) * 1000, 1)}
    return {**turn, **changes, "timings_ms": timings}  # type: ignore[typeddict-item]


def degrade(turn: Turn, what: Degradation) -> list[Degradation]:
    return turn["degraded"] if what in turn["degraded"] else [*turn["degraded"], what]


async def transcribe(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """A voice turn's words from the transcriber; a text turn's as typed."""
    started = time.perf_counter()
    turn, context = state["turn"], runtime.context
    services = context.services
    if context.audio is not None and context.audio_format is not None:
        try:
            transcript = await services.groq.transcribe(
                services.settings.transcription_model,
                context.audio,
                # The transcriber goes by the file name: it must match what the bytes are.
                f"speech.{context.audio_format.extension}",
                context.audio_format.content_type,
                deadline=context.time_for(services.settings.transcribe_budget_s),
            )
        except ProviderError as error:
            raise TranscriptionFailed(error.reason) from None
        if not transcript:
            raise NothingHeard
    else:
        transcript = turn.get("text", "")
    timed_turn = timed(turn, "transcribe", started, transcript=transcript)
    if context.events is not None:
        context.events("transcript", {"text": transcript})
    if _unanswered(state, transcript):
        # The same words again after `reply_unavailable` kept them: a retry, answered once.
        return {"turn": timed_turn}
    message: Message = {"role": "user", "text": transcript, "at": now(), "turn_id": turn["turn_id"]}
    return {"turn": timed_turn, "messages": [message], "updated_at": message["at"]}


def _unanswered(state: Conversation, words: str) -> bool:
    """Whether the conversation ends with these very words of the person, unanswered."""
    messages = state.get("messages", [])
    return bool(messages) and messages[-1]["role"] == "user" and messages[-1]["text"] == words


async def recall(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Long-term memories of this person that the last few messages bring up."""
    started = time.perf_counter()
    turn, services = state["turn"], runtime.context.services
    if services.memory is None:
        return {}
    query = " ".join(message["text"] for message in state["messages"][-RECALL_FROM_LAST_MESSAGES:])
    try:
        found = await services.memory.recall(state["session_id"], query, services.settings.memory_recall_limit)
    except MemoryUnavailable:
        return {"turn": timed(turn, "recall", started, memories=[], degraded=degrade(turn, "memory"))}
    return {"turn": timed(turn, "recall", started, memories=[memory.text for memory in found])}


async def reply(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """The companion's answer, from the persona, summary, recent messages and memories."""
    started = time.perf_counter()
    turn, context = state["turn"], runtime.context
    services = context.services
    settings = services.settings
    messages, start = state["messages"], state.get("summarised", 0)
    if not settings.feature_summaries:
        # Nothing folds the older messages away: the model sees as many of the latest as it
        # would at most with summaries, so a long conversation does not outgrow its context.
        start = max(start, len(messages) - settings.summarise_after_messages)
    recent = messages[start:]
    prompt = prompts.reply_prompt(state.get("summary", ""), recent, turn.get("memories", []))
    try:
        if context.events is None:
            text = await services.groq.chat(
                settings.chat_model, prompt, deadline=context.time_for(settings.reply_budget_s)
            )
        else:
            text = await _reply_and_speak(prompt, context)
    except ProviderError as error:
        retry_after = error.retry_after if error.retry_after is not None else DEFAULT_RETRY_AFTER
        return {"turn": timed(turn, "reply", started, reply_unavailable=True, retry_after=retry_after)}
    return {"turn": timed(turn, "reply", started, reply=text)}


async def _reply_and_speak(prompt: list[ChatMessage], context: TurnContext) -> str:
    """A streaming turn's reply: each delta told as it comes, and each sentence spoken as
    soon as it is complete, by one synthesis at a time beside the model's stream (sentence
    n is spoken while n+1 is written). The speech is kept in `context.spoken` for `speak`
    to store. A model that fails, even mid-reply, is the reply's failure; speech that fails
    stops the speaking, and the reply goes on as text."""
    services, settings = context.services, context.services.settings
    assert context.events is not None
    events = context.events
    speech: asyncio.Queue[str | None] = asyncio.Queue()
    speaker = None
    if settings.feature_speech:
        context.spoken = SpokenReply(content_type_of(settings.speech_output_format))
        speaker = asyncio.create_task(_speak_sentences(speech, context.spoken, context))
    sentences = Sentences()
    parts: list[str] = []
    try:
        stream = services.groq.chat_stream(
            settings.chat_model, prompt, deadline=context.time_for(settings.reply_budget_s)
        )
        async with contextlib.aclosing(stream) as deltas:
            async for delta in deltas:
                parts.append(delta)
                events("reply", {"delta": delta})
                for sentence in sentences.push(delta):
                    speech.put_nowait(sentence)
        for sentence in sentences.end():
            speech.put_nowait(sentence)
        speech.put_nowait(None)
        if speaker is not None:
            await speaker
    finally:
        if speaker is not None and not speaker.done():
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaker
    return "".join(parts)


async def _speak_sentences(sentences: asyncio.Queue[str | None], spoken: SpokenReply, context: TurnContext) -> None:
    settings, events = context.services.settings, context.events
    assert events is not None
    while (sentence := await sentences.get()) is not None:
        if spoken.failed:
            continue  # drain: the reply goes on as text
        try:
            stream = context.services.elevenlabs.speak_stream(
                sentence,
                voice_id=settings.elevenlabs_voice_id,
                model=settings.speech_model,
                output_format=settings.speech_output_format,
                deadline=context.time_for(settings.speak_budget_s),
            )
            async with contextlib.aclosing(stream) as pieces:
                audio = b"".join([piece async for piece in pieces])
        except ProviderError:
            spoken.failed = True
            continue
        events(
            "audio",
            {"seq": len(spoken.chunks), "content_type": spoken.content_type, "data": base64.b64encode(audio).decode()},
        )
        spoken.chunks.append(audio)


def after_reply(state: Conversation) -> str:
    return "end" if state["turn"].get("reply_unavailable") else "speak"


async def speak(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """The answer as speech, kept in the audio store; the text stands alone if speech fails."""
    started = time.perf_counter()
    turn, context = state["turn"], runtime.context
    services, settings = context.services, context.services.settings
    text = turn.get("reply", "")
    message: Message = {"role": "assistant", "text": text, "at": now(), "turn_id": turn["turn_id"]}
    update: dict[str, Any] = {"messages": [message], "updated_at": message["at"]}
    if not settings.feature_speech:
        return update
    if context.spoken is not None:  # spoken already, as the reply streamed
        if context.spoken.failed or not context.spoken.chunks:
            return {**update, "turn": timed(turn, "speak", started, degraded=degrade(turn, "speech"))}
        audio_id = await services.audio.save(b"".join(context.spoken.chunks), context.spoken.content_type)
        message["audio_id"] = audio_id
        return {**update, "turn": timed(turn, "speak", started, audio_id=audio_id)}
    try:
        audio, content_type = await services.elevenlabs.speak(
            text,
            voice_id=settings.elevenlabs_voice_id,
            model=settings.speech_model,
            output_format=settings.speech_output_format,
            deadline=context.time_for(settings.speak_budget_s),
        )
    except ProviderError:
        changes: dict[str, Any] = {"degraded": degrade(turn, "speech")}
    else:
        audio_id = await services.audio.save(audio, content_type)
        message["audio_id"] = audio_id
        changes = {"audio_id": audio_id}
    return {**update, "turn": timed(turn, "speak", started, **changes)}


async def remember(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """A lasting fact from what the user just said, if there is one and it is new."""
    started = time.perf_counter()
    turn, context = state["turn"], runtime.context
    services = context.services
    if services.memory is None:
        return {}
    if "memory" in turn["degraded"]:
        return {"turn": timed(turn, "remember", started)}  # the store is down: nothing to write to
    try:
        answer = await services.groq.chat(
            services.settings.memory_model,
            prompts.memory_prompt(turn.get("transcript", "")),
            deadline=context.time_for(services.settings.remember_budget_s),
            json_object=True,
        )
        fact = _fact(answer)
        stored = await services.memory.remember(state["session_id"], fact) if fact else False
    except (ProviderError, MemoryUnavailable):
        return {"turn": timed(turn, "remember", started, degraded=degrade(turn, "memory"))}
    return {"turn": timed(turn, "remember", started, remembered=stored)}


async def summarise(state: Conversation, runtime: Runtime[TurnContext]) -> dict[str, Any]:
    """Folds older messages into the running summary once the conversation is long."""
    started = time.perf_counter()
    turn, context = state["turn"], runtime.context
    settings = context.services.settings
    if not settings.feature_summaries:
        return {}
    messages, summarised = state["messages"], state.get("summarised", 0)
    if len(messages) - summarised <= settings.summarise_after_messages:
        return {"turn": timed(turn, "summarise", started)}
    until = len(messages) - settings.keep_recent_messages
    try:
        summary = await context.services.groq.chat(
            settings.memory_model,
            prompts.summary_prompt(state.get("summary", ""), messages[summarised:until]),
            deadline=context.time_for(settings.summarise_budget_s),
        )
    except ProviderError:
        return {"turn": timed(turn, "summarise", started, degraded=degrade(turn, "summary"))}
    return {"turn": timed(turn, "summarise", started), "summary": summary, "summarised": until}


def _fact(answer: str) -> str | None:
    try:
        document = json.loads(answer)
    except ValueError:
        return None
    fact = document.get("fact") if isinstance(document, dict) else None
    return fact.strip() if isinstance(fact, str) and fact.strip() else None
