"""The voice turn as a LangGraph workflow: typed state, small typed nodes, one graph."""
