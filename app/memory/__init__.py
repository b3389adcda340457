"""Long-term memory: facts about a person, kept across sessions' turns, never shared."""
