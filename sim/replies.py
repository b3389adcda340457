"""What the simulated LLM says: a pure function of the messages, so tests can predict it.

Text replies:
- a system prompt containing "summar" (summarise, summary...): `Summary: ` and the first
  300 characters of the user and assistant messages, joined by spaces;
- otherwise `I hear you: "<last user message>". (context: N messages, M memories)`, where N
  counts the user and assistant messages before the last user message and M the `- ` lines
  of each `Memories:` section in the system messages.

JSON-object replies:
- a system prompt that mentions memories or facts is the memory analyser: `{"fact": ...}`,
  a third-person rewrite of the last user message when it says something about the speaker
  (and is not a question), else `{"fact": null}`;
- otherwise `{"text": "<last user message>"}`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

SUMMARY_LENGTH = 300

_SUMMARY = re.compile(r"summar", re.IGNORECASE)
_MEMORY_PROMPT = re.compile(r"\b(memory|memories|facts?)\b", re.IGNORECASE)
# The speaker talking about themselves: "I ...", "I'm", "my ..." anywhere.
_ABOUT_SPEAKER = re.compile(r"(?:^|[^\w'])(?:[Ii]|[Ii]'m|[Ii]'ve|[Ii]'d|[Ii]'ll|[Mm]y)(?![\w'])")
_TOKEN = re.compile(r"[A-Za-z']+|[^A-Za-z']+")

# First-person forms and what they become; None: "I" followed by a verb to conjugate.
_PRONOUNS: dict[str, str] = {
    "i'm": "the user is",
    "i've": "the user has",
    "i'd": "the user would",
    "i'll": "the user will",
    "my": "their",
    "mine": "theirs",
    "me": "them",
    "myself": "themselves",
}
_AFTER_I: dict[str, str] = {
    "am": "is",
    "have": "has",
    "do": "does",
    "don't": "doesn't",
    "was": "was",
    "wasn't": "wasn't",
}
# Words after "I" that need no -s: modals, past tenses people use most, and adverbs.
_UNCHANGED_AFTER_I = frozenset(
    {
        *("can", "could", "will", "would", "should", "shall", "might", "must", "may"),
        *("did", "didn't", "can't", "cannot", "won't", "wouldn't", "couldn't", "shouldn't"),
        *("had", "went", "got", "was", "were"),
    }
)
_ADVERBS = frozenset(
    {"really", "also", "just", "always", "never", "often", "usually", "still", "sometimes", "actually", "truly"}
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def last_user_message(messages: Sequence[Message]) -> tuple[int, str]:
    """(index, content) of the last user message; (-1, "") when there is none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "user":
            return index, messages[index].content
    return -1, ""


def count_memories(messages: Sequence[Message]) -> int:
    """`- ` lines right under a line starting with `Memories:`, in system messages."""
    count = 0
    for message in messages:
        if message.role != "system":
            continue
        in_section = False
        for line in message.content.splitlines():
            stripped = line.strip()
            if stripped.startswith("Memories:"):
                in_section = True
            elif in_section and stripped.startswith("- "):
                count += 1
            else:
                in_section = False
    return count


def system_text(messages: Sequence[Message]) -> str:
    return "\n".join(message.content for message in messages if message.role == "system")


def text_reply(messages: Sequence[Message]) -> str:
    if _SUMMARY.search(system_text(messages)):
        spoken = " ".join(m.content for m in messages if m.role in ("user", "assistant"))
        return "Summary: " + spoken[:SUMMARY_LENGTH]
    index, last = last_user_message(messages)
    earlier = sum(1 for m in messages[: max(index, 0)] if m.role in ("user", "assistant"))
    return f'I hear you: "{last}". (context: {earlier} messages, {count_memories(messages)} memories)'


def json_reply(messages: Sequence[Message]) -> str:
    _, last = last_user_message(messages)
    reply: dict[str, Any]
    if _MEMORY_PROMPT.search(system_text(messages)):
        reply = {"fact": third_person(last) if states_fact(last) else None}
    else:
        reply = {"text": last}
    return orjson.dumps(reply).decode()


def states_fact(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and not stripped.endswith("?") and _ABOUT_SPEAKER.search(stripped) is not None


def _third_person_verb(verb: str) -> str:
    lower = verb.lower()
    if lower in _AFTER_I:
        return _AFTER_I[lower]
    if lower in _UNCHANGED_AFTER_I or not verb.isalpha() or not verb.islower():
        return verb
    if lower.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if len(lower) > 1 and lower.endswith("y") and lower[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def third_person(text: str) -> str:
    """A rough third-person rewrite: "I love my dog" -> "The user loves their dog.",
    "My sister lives in Paris" -> "The user's sister lives in Paris."."""
    tokens = _TOKEN.findall(text.strip())
    out: list[str] = []
    conjugate_next = False
    for token in tokens:
        if not token[0].isalpha() and token[0] != "'":
            out.append(token)
            if any(mark in token for mark in ".!?;:"):
                conjugate_next = False  # a new sentence or clause: no verb to agree
            continue
        lower = token.lower()
        if conjugate_next:
            if lower in _ADVERBS:
                out.append(token)
                continue
            out.append(_third_person_verb(token))
            conjugate_next = False
        elif lower == "i":
            out.append("the user")
            conjugate_next = True
        elif lower in _PRONOUNS:
            # Until the user has been named, "my dog" is "the user's dog", then "their dog".
            named = any("the user" in part for part in out)
            replacement = "the user's" if lower == "my" and not named else _PRONOUNS[lower]
            # "My" opening a sentence becomes "Their"; "I'm" is capital wherever it stands.
            capital = token[0].isupper() and not lower.startswith("i'")
            out.append(replacement[0].upper() + replacement[1:] if capital else replacement)
        else:
            out.append(token)
    fact = "".join(out).strip()
    if not fact:
        return fact
    fact = fact[0].upper() + fact[1:]
    return fact if fact[-1] in ".!" else fact + "."
