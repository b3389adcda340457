"""Memories in Qdrant, each scoped to the session that made it.

Every point carries its owner's `session_id`, and every search and deletion is
limited to the owner: one person's memories never surface in another's conversation (the
app this replaces had isolation switched off). Where they live depends on the store:

- a Qdrant server keeps everybody's memories in one collection, filtered by an index on
  `session_id` - Qdrant's own advice for many tenants;
- the embedded store has no indexes and filters by scanning every point, so a search
  would cost more with every memory anybody ever stored (measured: 48 ms a turn at 2,000
  memories); there each session has a collection of its own.

Near-duplicates of a stored fact are skipped. Search ranks by similarity, then favours
recent facts among the close ones. Forgetting a session in the embedded store deletes its
collection's files, and nothing of it stays on disk once `forget_session` returns.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.local.async_qdrant_local import AsyncQdrantLocal

from app.memory.embedding import Embedder

SHARED_COLLECTION = "memories"


class MemoryUnavailable(Exception):
    """The vector store could not be reached or failed."""


@dataclass(frozen=True)
class Memory:
    text: str
    created_at: float
    score: float


class MemoryStore:
    def __init__(
        self, client: AsyncQdrantClient, embedder: Embedder, *, duplicate_similarity: float, server: bool
    ) -> None:
        self.client = client
        self.embedder = embedder
        self.duplicate_similarity = duplicate_similarity
        self.shared = server
        self._known_collections: set[str] = set()

    async def setup(self) -> None:
        if not self.shared:
            return  # collections are made per session, on its first memory
        try:
            await self._ensure_collection(SHARED_COLLECTION)
        except Exception as exc:  # the client raises many kinds; all mean "not usable now"
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def recall(self, session_id: str, query: str, limit: int) -> list[Memory]:
        if not query.strip():
            return []
        collection, owned = self._where(session_id)
        try:
            if not await self._exists(collection):
                return []
            result = await self.client.query_points(
                collection, query=self.embedder.embed(query), query_filter=owned, limit=limit * 2, with_payload=True
            )
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        found = [
            Memory(str(point.payload["text"]), float(point.payload["created_at"]), point.score)
            for point in result.points
            if point.payload
        ]
        # Similar enough to matter first; among those, newer facts first (people change).
        found.sort(key=lambda memory: (round(memory.score, 1), memory.created_at), reverse=True)
        return found[:limit]

    async def remember(self, session_id: str, fact: str) -> bool:
        """Stores `fact` unless a near-duplicate is already there; True if stored."""
        collection, owned = self._where(session_id)
        vector = self.embedder.embed(fact)
        try:
            await self._ensure_collection(collection)
            nearest = await self.client.query_points(collection, query=vector, query_filter=owned, limit=1)
            if nearest.points and nearest.points[0].score >= self.duplicate_similarity:
                return False
            point = models.PointStruct(
                id=str(uuid.uuid4()),
                vector=vector,
                payload={"session_id": session_id, "text": fact, "created_at": time.time()},
            )
            await self.client.upsert(collection, points=[point], wait=True)
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        return True

    async def forget_session(self, session_id: str) -> None:
        collection, owned = self._where(session_id)
        try:
            if owned is None:
                self._close_embedded(collection)
                await self.client.delete_collection(collection)
                self._known_collections.discard(collection)
            else:
                await self.client.delete(collection, points_selector=models.FilterSelector(filter=owned), wait=True)
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def check(self) -> bool:
        """A real query against the store, for readiness."""
        try:
            await self.client.get_collections()
        except Exception:
            return False
        return True

    def _where(self, session_id: str) -> tuple[str, models.Filter | None]:
        """The session's collection, and the filter that limits it to the session."""
        if self.shared:
            owner = models.FieldCondition(key="session_id", match=models.MatchValue(value=session_id))
            return SHARED_COLLECTION, models.Filter(must=[owner])
        return f"memories-{session_id}", None  # session ids are URL-safe: valid collection names

    def _close_embedded(self, collection: str) -> None:
        """Closes an embedded collection's SQLite file before it is deleted. qdrant-client
        unlinks the file without closing it, and a reference cycle keeps it open until a
        garbage collection: until then the file, memories and all, stays on disk (and a
        descriptor is held per deleted session). There is no public way to close it: this
        reaches into qdrant-client 1.20.0 (`_client`, `collections`), and
        tests/test_app_privacy.py fails if an upgrade moves them."""
        local = self.client._client
        if isinstance(local, AsyncQdrantLocal):
            opened = local.collections.get(collection)
            if opened is not None:
                opened.close()

    async def _exists(self, collection: str) -> bool:
        if collection in self._known_collections:
            return True
        if await self.client.collection_exists(collection):
            self._known_collections.add(collection)
            return True
        return False

    async def _ensure_collection(self, collection: str) -> None:
        if await self._exists(collection):
            return
        vectors = models.VectorParams(size=self.embedder.dimensions, distance=models.Distance.COSINE)
        await self.client.create_collection(collection, vectors_config=vectors)
        if self.shared:
            await self.client.create_payload_index(
                collection, "session_id", field_schema=models.PayloadSchemaType.KEYWORD
            )
        self._known_collections.add(collection)
