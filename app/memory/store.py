"""Memories in Qdrant, each scoped to the session that made it.

Every point carries its owner's `session_id` and every search and deletion filters on it:
one person's memories never surface in another's conversation (the app this replaces had
isolation switched off). Near-duplicates of a stored fact are skipped. Search ranks by
similarity, then favours recent facts among the close ones.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from qdrant_client import AsyncQdrantClient, models

from app.memory.embedding import Embedder

COLLECTION = "memories"


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
        self.server = server

    async def setup(self) -> None:
        try:
            if not await self.client.collection_exists(COLLECTION):
                await self.client.create_collection(
                    COLLECTION,
                    vectors_config=models.VectorParams(size=self.embedder.dimensions, distance=models.Distance.COSINE),
                )
                if self.server:  # the embedded store scans; a server filters by index
                    await self.client.create_payload_index(
                        COLLECTION, "session_id", field_schema=models.PayloadSchemaType.KEYWORD
                    )
        except Exception as exc:  # the client raises many kinds; all mean "not usable now"
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def recall(self, session_id: str, query: str, limit: int) -> list[Memory]:
        if not query.strip():
            return []
        try:
            result = await self.client.query_points(
                COLLECTION,
                query=self.embedder.embed(query),
                query_filter=_owned_by(session_id),
                limit=limit * 2,
                with_payload=True,
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
        vector = self.embedder.embed(fact)
        try:
            nearest = await self.client.query_points(
                COLLECTION, query=vector, query_filter=_owned_by(session_id), limit=1
            )
            if nearest.points and nearest.points[0].score >= self.duplicate_similarity:
                return False
            await self.client.upsert(
                COLLECTION,
                points=[
                    models.PointStruct(
                        id=str(uuid.uuid4()),
                        vector=vector,
                        payload={"session_id": session_id, "text": fact, "created_at": time.time()},
                    )
                ],
                wait=True,
            )
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        return True

    async def forget_session(self, session_id: str) -> None:
        try:
            await self.client.delete(
                COLLECTION, points_selector=models.FilterSelector(filter=_owned_by(session_id)), wait=True
            )
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def count(self, session_id: str) -> int:
        try:
            result = await self.client.count(COLLECTION, count_filter=_owned_by(session_id), exact=True)
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        return result.count

    async def check(self) -> bool:
        """A real query against the store, for readiness."""
        try:
            await self.client.count(COLLECTION, exact=False)
        except Exception:
            return False
        return True


def _owned_by(session_id: str) -> models.Filter:
    return models.Filter(must=[models.FieldCondition(key="session_id", match=models.MatchValue(value=session_id))])
