"""How long a simulated provider takes: the latency profile (SIM_PROFILE).

- `instant` (the default): the providers answer at once; only SIM_LATENCY_MS, the per-route
  latency and the faults' delays add time.
- `realistic`: each call takes what the real provider takes, from its published figures
  (docs/simulator.md#latency-profiles has each figure's source, and says where none is
  published):
  - a chat completion's first token after the model's time to first token (TTFT), the
    following ones at its tokens per second; a call without `stream` answers when the
    last token would have come, TTFT + tokens / speed;
  - a transcription after a fixed overhead plus the audio's duration divided by the
    model's real-time speed factor;
  - speech's first bytes after the model's time to first byte (TTFB), the rest as fast as
    it is synthesised (seconds of audio per second); without streaming, TTFB + the
    audio's duration / the synthesis speed.

Each SIM_REALISTIC_* variable that is set replaces one figure for every model.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.settings import Profile, SimSettings

# Groq chat models: (time to first token in ms, output tokens per second). The speeds are
# Groq's models page; Groq publishes no TTFT, so those are chosen from third-party
# measurements (docs/simulator.md#latency-profiles).
CHAT_FIGURES: dict[str, tuple[int, float]] = {
    "llama-3.1-8b-instant": (200, 560),
    "llama-3.3-70b-versatile": (250, 280),
    "meta-llama/llama-4-scout-17b-16e-instruct": (250, 750),
    "meta-llama/llama-4-maverick-17b-128e-instruct": (250, 600),
    "openai/gpt-oss-20b": (250, 1000),
    "openai/gpt-oss-120b": (300, 500),
    "qwen/qwen3-32b": (300, 400),
}

# Groq Whisper models: real-time speed factor (seconds of audio transcribed per second).
TRANSCRIPTION_SPEED_FACTORS: dict[str, float] = {
    "whisper-large-v3": 189,
    "whisper-large-v3-turbo": 216,
}

# ElevenLabs text-to-speech models: (time to first byte in ms, seconds of audio
# synthesised per second). ElevenLabs publishes the Flash and Turbo latencies only.
SPEECH_FIGURES: dict[str, tuple[int, float]] = {
    "eleven_flash_v2_5": (75, 16),
    "eleven_flash_v2": (75, 16),
    "eleven_turbo_v2_5": (300, 12),
    "eleven_turbo_v2": (300, 12),
    "eleven_multilingual_v2": (500, 4),
}


@dataclass(frozen=True)
class ChatPace:
    """When a chat completion's tokens come, in seconds after the model starts on it."""

    ttft: float
    seconds_per_token: float

    def token_at(self, index: int) -> float:
        """When token `index` (from 0) comes; `index` = the count: when the answer ends."""
        return self.ttft + index * self.seconds_per_token

    def total(self, tokens: int) -> float:
        return self.token_at(tokens)


@dataclass(frozen=True)
class SpeechPace:
    """When speech audio is ready, in seconds after the model starts on it."""

    ttfb: float
    seconds_per_audio_second: float

    def ready_at(self, audio_seconds: float) -> float:
        """When the audio up to `audio_seconds` is ready, the first part within the TTFB."""
        return self.ttfb + audio_seconds * self.seconds_per_audio_second


INSTANT_CHAT = ChatPace(0.0, 0.0)
INSTANT_SPEECH = SpeechPace(0.0, 0.0)


class Latency:
    """The profile's figures, with the settings' overrides applied."""

    def __init__(self, settings: SimSettings) -> None:
        self.realistic = settings.profile is Profile.realistic
        self.ttft_ms = settings.realistic_ttft_ms
        self.tokens_per_second = settings.realistic_tokens_per_second
        self.transcription_overhead_ms = settings.realistic_transcription_overhead_ms
        self.transcription_speed_factor = settings.realistic_transcription_speed_factor
        self.ttfb_ms = settings.realistic_ttfb_ms
        self.synthesis_speed = settings.realistic_synthesis_speed

    def chat(self, model: str) -> ChatPace:
        if not self.realistic:
            return INSTANT_CHAT
        ttft_ms, tokens_per_second = CHAT_FIGURES[model]
        ttft_ms = ttft_ms if self.ttft_ms is None else self.ttft_ms
        tokens_per_second = tokens_per_second if self.tokens_per_second is None else self.tokens_per_second
        return ChatPace(ttft_ms / 1000, 1 / tokens_per_second)

    def transcription_seconds(self, model: str, audio_seconds: float) -> float:
        if not self.realistic:
            return 0.0
        factor = TRANSCRIPTION_SPEED_FACTORS[model]
        factor = factor if self.transcription_speed_factor is None else self.transcription_speed_factor
        return self.transcription_overhead_ms / 1000 + audio_seconds / factor

    def speech(self, model_id: str) -> SpeechPace:
        if not self.realistic:
            return INSTANT_SPEECH
        ttfb_ms, speed = SPEECH_FIGURES[model_id]
        ttfb_ms = ttfb_ms if self.ttfb_ms is None else self.ttfb_ms
        speed = speed if self.synthesis_speed is None else self.synthesis_speed
        return SpeechPace(ttfb_ms / 1000, 1 / speed)
