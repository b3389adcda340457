"""What the language model is told: the persona, and the memory and summary instructions."""

from __future__ import annotations

from app.providers.groq import ChatMessage
from app.workflow.state import Message

PERSONA = (
    "You are Rose, a warm and patient companion people talk to by voice. You listen more "
    "than you advise, you remember what people share with you, and you answer in two to "
    "four short spoken sentences: no lists, no markdown, nothing that sounds odd read "
    "aloud. If someone seems to be in danger, gently encourage them to contact local "
    "emergency services or a crisis line."
)

MEMORY_INSTRUCTIONS = (
    "You decide whether the user's last message holds a lasting fact worth remembering about "
    "them (their name, people and pets in their life, preferences, important events). Answer "
    'with a JSON object: {"fact": "<the fact in the third person, e.g. The user\'s dog is '
    'called Max>"} or {"fact": null} when there is nothing worth keeping.'
)

SUMMARY_INSTRUCTIONS = (
    "You summarise a conversation between a user and their companion Rose, so that Rose can "
    "continue it without the full transcript. Keep what matters: who the user is, what they "
    "talked about, how they felt, what Rose promised. At most 150 words, plain prose."
)


def reply_prompt(summary: str, recent: list[Message], memories: list[str]) -> list[ChatMessage]:
    system = PERSONA
    if summary:
        system += "\n\nEarlier in this conversation: " + summary
    if memories:
        system += "\n\nMemories:\n" + "\n".join(f"- {memory}" for memory in memories)
    prompt: list[ChatMessage] = [{"role": "system", "content": system}]
    prompt += [{"role": message["role"], "content": message["text"]} for message in recent]
    return prompt


def memory_prompt(user_text: str) -> list[ChatMessage]:
    return [{"role": "system", "content": MEMORY_INSTRUCTIONS}, {"role": "user", "content": user_text}]


def summary_prompt(summary: str, messages: list[Message]) -> list[ChatMessage]:
    transcript = "\n".join(f"{message['role']}: {message['text']}" for message in messages)
    if summary:
        transcript = f"Summary so far: {summary}\n\n{transcript}"
    return [{"role": "system", "content": SUMMARY_INSTRUCTIONS}, {"role": "user", "content": transcript}]
