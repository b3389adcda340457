"""What the simulated LLM says: a pure function of the messages, so tests can predict it.

Text replies (docs/simulator.md#what-it-says has the rules and examples):
- a system prompt containing "summar" (summarise, summary...): `Summary: ` and the first
  300 characters of the user and assistant messages, joined by spaces;
- otherwise a short reply a person trying the page can follow, built from the last user
  message and what the prompt gives: a greeting answered, a statement about the speaker
  reflected in the second person, "what do you remember" answered from the `Memories:`
  section, other questions answered honestly (it is a simulation).

What each call was given (`context`) is not in the reply: the simulator keeps it for
`GET /_sim/chats`, where tests read it.

JSON-object replies:
- a system prompt that mentions memories or facts is the memory analyser: `{"fact": ...}`,
  a third-person rewrite of the sentences of the last user message that say something
  about the speaker (and are not questions), else `{"fact": null}`;
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


_GREETING = re.compile(
    r"^(?:hello|hi|hey|hiya|good (?:morning|afternoon|evening)|greetings)(?: there| rose)?\b[\s,.!]*", re.IGNORECASE
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_RECALL = re.compile(r"\b(?:remember|recall|know about me)\b", re.IGNORECASE)
_RECALLED = 3  # memories said back at most: a spoken reply stays short
_ANSWERS = [
    (re.compile(r"\b(?:are you there|can you hear me)\b"), "Yes, I'm here and listening."),
    (re.compile(r"\bhow are you\b"), "I'm well, thank you for asking. How are you feeling today?"),
    (
        re.compile(r"\b(?:your name|who are you)\b"),
        "I'm Rose, your companion. Right now I'm a simulation running offline, so I keep things simple.",
    ),
]
_THE_USERS = re.compile(r"\bthe user's\b", re.IGNORECASE)
_THE_USER = re.compile(r"\bthe user\s+([A-Za-z']+)", re.IGNORECASE)
_BACK_FROM_THIRD = {"is": "are", "was": "were", "has": "have", "does": "do", "doesn't": "don't", "isn't": "aren't"}
_TO_YOU = {
    "i": "you",
    "i'm": "you're",
    "i've": "you've",
    "i'd": "you'd",
    "i'll": "you'll",
    "my": "your",
    "mine": "yours",
    "me": "you",
    "myself": "yourself",
    "their": "your",
    "theirs": "yours",
    "them": "you",
    "themselves": "yourself",
}
_AFTER_YOU = {"am": "are", "was": "were", "wasn't": "weren't"}
_STOP = frozenset(
    {
        *("what", "where", "when", "who", "how", "why", "which", "the", "and", "you", "your", "about", "that"),
        *("remember", "recall", "know", "anything", "something", "tell", "did", "does", "can", "could", "would"),
        *("user", "their", "they", "them", "have", "has", "was", "were", "are", "for", "with", "from", "this"),
    }
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


def memories_in(messages: Sequence[Message]) -> list[str]:
    """`- ` lines right under a line starting with `Memories:`, in system messages."""
    found: list[str] = []
    for message in messages:
        if message.role != "system":
            continue
        in_section = False
        for line in message.content.splitlines():
            stripped = line.strip()
            if stripped.startswith("Memories:"):
                in_section = True
            elif in_section and stripped.startswith("- "):
                found.append(stripped.removeprefix("- ").strip())
            else:
                in_section = False
    return found


def context(messages: Sequence[Message], json_mode: bool) -> dict[str, Any]:
    """What a call was given, as `GET /_sim/chats` lists it: its kind, the last user
    message, how many user and assistant messages came before it, how many memories."""
    index, last = last_user_message(messages)
    kind = "json" if json_mode else "summary" if _SUMMARY.search(system_text(messages)) else "reply"
    return {
        "kind": kind,
        "said": last,
        "messages": sum(1 for m in messages[: max(index, 0)] if m.role in ("user", "assistant")),
        "memories": len(memories_in(messages)),
    }


def system_text(messages: Sequence[Message]) -> str:
    return "\n".join(message.content for message in messages if message.role == "system")


def text_reply(messages: Sequence[Message]) -> str:
    if _SUMMARY.search(system_text(messages)):
        spoken = " ".join(m.content for m in messages if m.role in ("user", "assistant"))
        return "Summary: " + spoken[:SUMMARY_LENGTH]
    index, last = last_user_message(messages)
    met_before = any(m.role == "assistant" for m in messages[: max(index, 0)]) or bool(memories_in(messages))
    said = last.strip()
    greeting = _GREETING.match(said)
    rest = said[greeting.end() :].strip() if greeting else said
    parts: list[str] = []
    if greeting:
        parts.append("Hello again!" if met_before else "Hello, I'm Rose.")
    if not rest:
        parts.append("How are you today?" if greeting else "I'm listening. What's on your mind?")
    elif rest.endswith("?") and _RECALL.search(rest):
        parts.append(recollection(rest, memories_in(messages)))
    elif rest.endswith("?"):
        parts.append(answer(rest))
    elif states_fact(rest):
        parts.append(f"{second_person(rest)} Thank you for telling me, I'll keep that in mind.")
    else:
        parts.append("I see. Tell me more about that.")
    return " ".join(parts)


def recollection(question: str, memories: Sequence[str]) -> str:
    """The memories the question is about (sharing a word with it), or all of them."""
    if not memories:
        return "I don't remember anything about you yet. Tell me about yourself and I'll keep it in mind."
    asked = _content_words(question)
    relevant = [memory for memory in memories if asked & _content_words(memory)] or list(memories)
    facts = [_lower_you(second_person(memory).rstrip(".!")) for memory in relevant[:_RECALLED]]
    listed = facts[0] if len(facts) == 1 else ", ".join(facts[:-1]) + " and " + facts[-1]
    return f"I remember that {listed}."


def _lower_you(fact: str) -> str:
    return "y" + fact[1:] if fact.startswith(("You ", "Your ", "You'")) else fact


def answer(question: str) -> str:
    lower = question.lower()
    for pattern, reply in _ANSWERS:
        if pattern.search(lower):
            return reply
    return (
        "That's a good question. I'm the companion's offline simulation, so I can't really "
        "answer it, but I'm glad to keep talking."
    )


def second_person(text: str) -> str:
    """The speaker's own words, or a memory about "the user", said back to them: "I love my
    dog" and "The user loves their dog." both become "You love your dog." """
    words = text.strip()
    words = _THE_USERS.sub("your", words)
    words = _THE_USER.sub(lambda match: "you " + _second_person_verb(match.group(1)), words)
    out: list[str] = []
    after_i = False
    for token in _TOKEN.findall(words):
        lower = token.lower()
        if after_i and token[0].isalpha():
            out.append(_AFTER_YOU.get(lower, token))
            after_i = False
            continue
        if token[0].isalpha() or token[0] == "'":
            after_i = lower == "i"
        out.append(_TO_YOU.get(lower, token) if token[0].isalpha() else token)
    said = _SENTENCE_START.sub(lambda match: match.group(1) + match.group(2).upper(), "".join(out).strip())
    return said if not said or said[-1] in ".!" else said + "."


def _second_person_verb(verb: str) -> str:
    lower = verb.lower()
    if lower in _BACK_FROM_THIRD:
        return _BACK_FROM_THIRD[lower]
    if lower.endswith("ies") and len(lower) > 4:
        return verb[:-3] + "y"
    if lower.endswith(("sses", "shes", "ches", "xes", "zes", "oes")):
        return verb[:-2]
    if lower.endswith("s") and not lower.endswith("ss"):
        return verb[:-1]
    return verb


def _content_words(text: str) -> set[str]:
    return {word.rstrip("s") for word in re.findall(r"[a-z]+", text.lower()) if word not in _STOP and len(word) > 2}


def json_reply(messages: Sequence[Message]) -> str:
    _, last = last_user_message(messages)
    reply: dict[str, Any]
    if _MEMORY_PROMPT.search(system_text(messages)):
        about_speaker = " ".join(sentence for sentence in _SENTENCE.split(last.strip()) if states_fact(sentence))
        reply = {"fact": third_person(about_speaker) if about_speaker else None}
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
