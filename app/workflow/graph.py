"""The turn graph, compiled with a checkpointer: one thread per session.

A run stops after `speak` (a static interrupt): what the person waits for - the words,
the reply, its speech - is done, and the turn is answered. Resuming the thread (input
`None`) runs the work that only the next turn needs: `remember` and `summarise`
(`Companion`, docs/app.md#a-turn).
"""

from __future__ import annotations

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from app.workflow import nodes
from app.workflow.state import Conversation, TurnContext

TurnGraph = CompiledStateGraph[Conversation, TurnContext, Conversation, Conversation]


def build_graph(checkpointer: BaseCheckpointSaver[str]) -> TurnGraph:
    graph = StateGraph(Conversation, context_schema=TurnContext)
    graph.add_node("transcribe", nodes.transcribe)
    graph.add_node("recall", nodes.recall)
    graph.add_node("reply", nodes.reply)
    graph.add_node("speak", nodes.speak)
    graph.add_node("remember", nodes.remember)
    graph.add_node("summarise", nodes.summarise)
    graph.add_edge(START, "transcribe")
    graph.add_edge("transcribe", "recall")
    graph.add_edge("recall", "reply")
    graph.add_conditional_edges("reply", nodes.after_reply, {"speak": "speak", "end": END})
    graph.add_edge("speak", "remember")
    graph.add_edge("remember", "summarise")
    graph.add_edge("summarise", END)
    return graph.compile(checkpointer=checkpointer, interrupt_after=AFTER_THE_ANSWER)


# The last step whose result the person is waiting for.
AFTER_THE_ANSWER = ["speak"]
