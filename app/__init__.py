"""The internal app: a voice companion, FastAPI around a LangGraph turn workflow."""
