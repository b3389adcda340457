"""A streamed reply cut into what can be spoken on its own, as the text arrives: sentences,
and clauses of a sentence that runs long - so that speech of the first can start while
the model still writes the next (docs/app.md#the-streaming-turn).

A sentence ends at `.`, `!`, `?` or `…` (or a run of them, and closing quotes or brackets)
followed by whitespace, or at a line break; "3.5" does not end one. Whether an ending
ended a sentence is known only once the next character is there, so the splitter holds
it back until then; `end()` gives what is left.
"""

from __future__ import annotations

import re

# An ending, what may close it, then whitespace: the split falls after the whitespace.
SENTENCE_END = re.compile("[.!?\u2026]+[\"'\u201d\u2019)\\]]*\\s+|\n+")
CLAUSE_END = re.compile("[,;:\u2014]\\s+")
# A sentence longer than this is cut at its last clause boundary so far.
LONG_SENTENCE = 160


class Sentences:
    def __init__(self) -> None:
        self.pending = ""

    def push(self, delta: str) -> list[str]:
        """The pieces `delta` completes, in order."""
        self.pending += delta
        found: list[str] = []
        while True:
            match = SENTENCE_END.search(self.pending)
            if match is None or match.end() == len(self.pending):
                # No ending yet, or one whose whitespace may still grow: wait for more.
                break
            found.append(self.pending[: match.end()])
            self.pending = self.pending[match.end() :]
        if len(self.pending) > LONG_SENTENCE:
            clauses = list(CLAUSE_END.finditer(self.pending))
            if clauses and clauses[-1].end() < len(self.pending):
                cut = clauses[-1].end()
                found.append(self.pending[:cut])
                self.pending = self.pending[cut:]
        return [piece.strip() for piece in found if piece.strip()]

    def end(self) -> list[str]:
        """What is left once the reply is complete."""
        rest, self.pending = self.pending.strip(), ""
        return [rest] if rest else []
