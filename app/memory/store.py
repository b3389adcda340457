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

Every point also carries the `embedder` that made its vector (its name and version), and
every search and duplicate check is limited to the current embedder's points: vectors of
two embedders are never compared. `re_embed` brings the others into the current space from
their stored text, in place (docs/app.md#upgrading-the-embedder); until it has, they are
not recalled. A collection of another size than the embedder's vectors is refused.
Embedding is CPU work (milliseconds a sentence): it runs in a worker thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.local.async_qdrant_local import AsyncQdrantLocal

from app.memory.embedding import Embedder

SHARED_COLLECTION = "memories"
EMBEDDED_PREFIX = "memories-"
RE_EMBED_BATCH = 64
logger = logging.getLogger("app.memory")


class MemoryUnavailable(Exception):
    """The vector store could not be reached or failed."""


class EmbedderMismatch(Exception):
    """The store holds vectors of another size than the embedder makes: re-embedding in
    place cannot fix that."""


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
        self.refusal: str | None = None
        self._known_collections: set[str] = set()

    def refuse(self, reason: str) -> None:
        """From now on every call fails: the store holds what this embedder cannot use."""
        self.refusal = reason

    async def setup(self) -> None:
        if not self.shared:
            return  # collections are made per session, on its first memory
        try:
            await self._ensure_collection(SHARED_COLLECTION)
        except EmbedderMismatch:
            raise
        except Exception as exc:  # the client raises many kinds; all mean "not usable now"
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def recall(self, session_id: str, query: str, limit: int) -> list[Memory]:
        if not query.strip():
            return []
        collection, owned = self._where(session_id)
        try:
            if not await self._exists(collection):
                return []
            (vector,) = await self._embed([query])
            result = await self.client.query_points(
                collection, query=vector, query_filter=owned, limit=limit * 2, with_payload=True
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
        (vector,) = await self._embed([fact])
        try:
            await self._ensure_collection(collection)
            nearest = await self.client.query_points(collection, query=vector, query_filter=owned, limit=1)
            if nearest.points and nearest.points[0].score >= self.duplicate_similarity:
                return False
            point = models.PointStruct(
                id=str(uuid.uuid4()),
                vector=vector,
                payload={
                    "session_id": session_id,
                    "text": fact,
                    "created_at": time.time(),
                    "embedder": self.embedder.name,
                },
            )
            await self.client.upsert(collection, points=[point], wait=True)
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        return True

    async def forget_session(self, session_id: str) -> None:
        collection, _ = self._where(session_id)
        try:
            if not self.shared:
                self._close_embedded(collection)
                await self.client.delete_collection(collection)
                self._known_collections.discard(collection)
            else:
                # Every point of the session, whichever embedder made it.
                owner = models.FieldCondition(key="session_id", match=models.MatchValue(value=session_id))
                selector = models.FilterSelector(filter=models.Filter(must=[owner]))
                await self.client.delete(collection, points_selector=selector, wait=True)
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc

    async def re_embed(self) -> int:
        """Re-embeds, from their stored text, the memories another embedder made (or one
        from before vectors were tagged), in place: same point, new vector, then the new
        tag, so a point is searched only once its vector is the current embedder's. Points
        deleted meanwhile stay deleted (vectors and payloads are updated, never upserted).
        Safe to repeat and to interrupt; returns how many it re-embedded."""
        done = 0
        try:
            for collection in await self._collections():
                await self._check_size(collection)
                async for points in self._stale_points(collection):
                    texts = [str(point.payload["text"]) if point.payload else "" for point in points]
                    vectors = await self._embed(texts)
                    ids = [point.id for point in points]
                    updates = [models.PointVectors(id=i, vector=v) for i, v in zip(ids, vectors, strict=True)]
                    await self.client.update_vectors(collection, points=updates, wait=True)
                    await self.client.set_payload(collection, {"embedder": self.embedder.name}, points=ids, wait=True)
                    done += len(ids)
        except EmbedderMismatch:
            raise
        except Exception as exc:
            raise MemoryUnavailable(type(exc).__name__) from exc
        return done

    async def check(self) -> bool:
        """A real query against the store, for readiness."""
        if self.refusal is not None:
            return False
        try:
            await self.client.get_collections()
        except Exception:
            return False
        return True

    def _where(self, session_id: str) -> tuple[str, models.Filter]:
        """The session's collection, and the filter that limits a search to the session's
        points of the current embedder."""
        if self.shared:
            owner = models.FieldCondition(key="session_id", match=models.MatchValue(value=session_id))
            return SHARED_COLLECTION, models.Filter(must=[owner, self._current])
        # Session ids are URL-safe: valid collection names.
        return f"{EMBEDDED_PREFIX}{session_id}", models.Filter(must=[self._current])

    @property
    def _current(self) -> models.FieldCondition:
        return models.FieldCondition(key="embedder", match=models.MatchValue(value=self.embedder.name))

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        if self.refusal is not None:
            raise MemoryUnavailable("EmbedderMismatch")
        return await asyncio.to_thread(self.embedder.embed_many, texts)

    async def _collections(self) -> list[str]:
        if self.shared:
            return [SHARED_COLLECTION] if await self.client.collection_exists(SHARED_COLLECTION) else []
        found = await self.client.get_collections()
        return [collection.name for collection in found.collections if collection.name.startswith(EMBEDDED_PREFIX)]

    async def _stale_points(self, collection: str) -> AsyncIterator[list[models.Record]]:
        stale = models.Filter(must_not=[self._current])
        offset: models.ExtendedPointId | None = None
        while True:
            points, offset = await self.client.scroll(
                collection, scroll_filter=stale, limit=RE_EMBED_BATCH, offset=offset, with_payload=True
            )
            if points:
                yield points
            if offset is None:
                return

    async def _check_size(self, collection: str) -> None:
        vectors = (await self.client.get_collection(collection)).config.params.vectors
        size = vectors.size if isinstance(vectors, models.VectorParams) else None
        if size != self.embedder.dimensions:
            raise EmbedderMismatch(
                f"the memory store holds vectors of {size} dimensions and {self.embedder.name} makes "
                f"{self.embedder.dimensions}: re-embedding cannot convert them; start from an empty memory "
                "store (docs/app.md#upgrading-the-embedder)"
            )

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
            if self.shared:
                await self._check_size(collection)
            return
        vectors = models.VectorParams(size=self.embedder.dimensions, distance=models.Distance.COSINE)
        await self.client.create_collection(collection, vectors_config=vectors)
        if self.shared:
            await self.client.create_payload_index(
                collection, "session_id", field_schema=models.PayloadSchemaType.KEYWORD
            )
        self._known_collections.add(collection)
