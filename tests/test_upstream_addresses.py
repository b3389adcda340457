"""The edge in front of several upstream replicas behind one name (docs/proxy.md, "Several
upstream addresses").

The replicas are real servers on 127.0.0.1, 127.0.0.2 and 127.0.0.3, one port for all
(`tests/replicas_support.py`). The name is resolved through the edge's one seam to name
resolution, the `resolve` argument of `build_app`, which stands in for Docker's DNS here: a
name cannot be made to resolve to several addresses on a shared machine without editing
/etc/hosts (`localhost` resolves to 127.0.0.1 only). The last test resolves `localhost`
with the system resolver the edge uses by default. Connection attempts are counted where
the replica accepts them, and bytes where it receives them, so nothing here relies on the
edge's own account of what it did.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from edge.app import build_app
from edge.policy import Policy
from edge.server.serve import server_config
from edge.settings import EdgeSettings
from tests.replicas_support import ADDRESSES, Replicas, ReplicaSet
from tests.servers import RunningEdge, ServerThread, proxy_of, running_edge, wait_until
from tests.wire import raw_exchange

ONE, TWO, THREE = ADDRESSES
LONG_EJECTION = 60.0  # longer than any test: an ejected address stays out throughout


@pytest.fixture
def replicas() -> Replicas:
    return Replicas(*ADDRESSES)


@pytest.fixture
def servers(replicas: Replicas) -> Iterator[ReplicaSet]:
    started = ReplicaSet(replicas)
    for host in replicas.addresses:
        started[host].start()
    yield started
    started.close()


@contextmanager
def edge_for(replicas: Replicas, **overrides: Any) -> Iterator[RunningEdge]:
    """The edge as `python -m edge` builds it, its upstream name resolved by `replicas`."""
    settings = EdgeSettings(upstream_url=replicas.url, rate_limit_default="off", **overrides)
    app = build_app(settings, Policy(), resolve=replicas)
    edge = RunningEdge(ServerThread(server_config(settings, app)).start(), proxy_of(app), settings)
    try:
        yield edge
    finally:
        edge.server.stop()


def client() -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10.0)


def answered_by(http: httpx.Client, edge: RunningEdge, count: int, path: str = "/") -> list[str]:
    """The replica (its address, which is what it answers) behind each of `count` GETs."""
    answers = []
    for _ in range(count):
        response = http.get(edge.url + path)
        assert response.status_code == 200, response.text
        answers.append(response.text)
    return answers


def warm(http: httpx.Client, edge: RunningEdge, hosts: list[str]) -> None:
    """One idle connection to each of `hosts` in the edge's pool."""
    assert sorted(answered_by(http, edge, len(hosts))) == sorted(hosts)
    assert wait_until(lambda: edge.proxy.pool.idle == len(hosts), 2.0)


# -- spreading -------------------------------------------------------------------------------------


def test_requests_are_spread_over_every_address(replicas: Replicas, servers: ReplicaSet) -> None:
    with edge_for(replicas) as edge, client() as http:
        answers = answered_by(http, edge, 30)
    # One after another, every address is as idle as the others: round-robin (10 each, but
    # for a request that arrives before the edge has put the last one's connection back).
    assert all(8 <= answers.count(host) <= 12 for host in ADDRESSES), answers
    # Each address has its kept-alive connections, reused: not one connection per request.
    assert sum(servers[host].accepted for host in ADDRESSES) <= 4


def test_a_busy_address_gets_no_new_requests_while_others_are_idle(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    with edge_for(replicas) as edge, client() as http:
        warm(http, edge, [ONE, TWO])
        with socket.create_connection(("127.0.0.1", edge.port), timeout=10.0) as held:
            held.sendall(b"GET /hold HTTP/1.1\r\nHost: edge\r\n\r\n")
            assert wait_until(lambda: sum(servers.answering("/hold").values()) == 1, 5.0)
            busy = ONE if servers[ONE].answered("/hold") else TWO
            answers = answered_by(http, edge, 6)
            servers[busy].release_held()
            assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
    # Least in use first: round-robin would have sent three of them to the busy one.
    assert set(answers) == {TWO if busy == ONE else ONE}


# -- an address that fails -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_stopped_replica_costs_no_request_a_failure(replicas: Replicas, servers: ReplicaSet, method: str) -> None:
    with edge_for(replicas, upstream_eject_time=LONG_EJECTION) as edge, client() as http:
        warm(http, edge, list(ADDRESSES))
        servers[TWO].stop()
        assert wait_until(lambda: edge.proxy.pool.idle == 2, 2.0), "the stopped replica's connection is kept"
        # Round-robin comes to the stopped address within three requests: its connection is
        # refused (nothing was sent), and the request goes to another address, POST or not.
        bodies = [f"body {number}".encode() for number in range(9)]
        responses = [http.request(method, edge.url + "/", content=body) for body in bodies]
    assert [response.status_code for response in responses] == [200] * 9
    assert {response.text for response in responses} == {ONE, THREE}
    received = servers.received()
    assert [received.count(body) for body in bodies] == [1] * 9


def test_a_refusing_address_gets_no_connection_attempt_while_ejected(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    servers[TWO].stop()
    with edge_for(replicas, upstream_eject_time=LONG_EJECTION) as edge, client() as http:
        assert set(answered_by(http, edge, 4)) == {ONE}  # the first pick of TWO was refused
        servers[TWO].start()  # listening again, but still out of rotation
        accepted = servers[TWO].accepted
        assert set(answered_by(http, edge, 10)) == {ONE}
        assert servers[TWO].accepted == accepted == 0


def test_an_address_that_resets_is_left_out_for_the_ejection(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    servers[TWO].resetting = True
    with edge_for(replicas, upstream_eject_time=LONG_EJECTION) as edge, client() as http:
        # Each GET answered: the one that met the reset was sent again, to the other address.
        assert set(answered_by(http, edge, 10)) == {ONE}
    # Counted where it accepts: one attempt (reset before any response byte), then none.
    assert servers[TWO].accepted == 1


def test_an_ejected_address_is_tried_again_after_the_ejection(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    servers[TWO].resetting = True
    with edge_for(replicas, upstream_eject_time=0.2) as edge, client() as http:
        assert wait_until(lambda: answered_by(http, edge, 1) == [ONE] and servers[TWO].accepted >= 2, 10.0)
        servers[TWO].resetting = False
        assert wait_until(lambda: answered_by(http, edge, 1) == [TWO], 10.0, interval=0.05)


def test_a_restarted_replica_comes_back_after_the_ejection(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    servers[TWO].stop()
    with edge_for(replicas, upstream_eject_time=0.3) as edge, client() as http:
        assert set(answered_by(http, edge, 4)) == {ONE}
        servers[TWO].start()
        assert wait_until(lambda: TWO in answered_by(http, edge, 1), 10.0, interval=0.05)


def test_every_address_out_at_once_is_tried_anyway(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    servers[ONE].stop()
    servers[TWO].stop()
    with edge_for(replicas, upstream_eject_time=LONG_EJECTION) as edge, client() as http:
        assert http.get(edge.url + "/").status_code == 502  # both refused: both ejected
        servers[ONE].start()
        assert answered_by(http, edge, 1) == [ONE]  # panic mode: the ejected are tried


# -- what is sent again, and what never is ----------------------------------------------------------


@pytest.mark.parametrize(("max_tries", "tries"), [(3, 3), (2, 2)])
def test_get_closed_unanswered_is_sent_once_to_each_address_up_to_max_tries(
    replicas: Replicas, servers: ReplicaSet, max_tries: int, tries: int
) -> None:
    with edge_for(replicas, upstream_max_tries=max_tries) as edge, client() as http:
        response = http.get(edge.url + "/reset-after-request")
    assert response.status_code == 502
    answered = servers.answering("/reset-after-request")
    assert sum(answered.values()) == tries
    assert set(answered.values()) <= {0, 1}  # never twice to one address


def test_post_whose_request_was_sent_is_never_replayed(replicas: Replicas, servers: ReplicaSet) -> None:
    body = b"a turn that must not be taken twice"
    with edge_for(replicas) as edge, client() as http:
        response = http.post(edge.url + "/reset-after-request", content=body)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert sum(servers.answering("/reset-after-request").values()) == 1
    assert servers.received().count(body) == 1


def test_get_cut_after_response_bytes_is_not_sent_again(replicas: Replicas, servers: ReplicaSet) -> None:
    with edge_for(replicas) as edge:
        exchange = raw_exchange(edge.port, b"GET /die-mid-response HTTP/1.1\r\nHost: edge\r\n\r\n")
    assert exchange.closed
    assert exchange.response.status == 200
    assert exchange.response.values("content-length") == [b"1000"]
    assert exchange.response.body == b"x" * 10  # cut short, as with one address
    assert sum(servers.answering("/die-mid-response").values()) == 1


# -- following the name ------------------------------------------------------------------------------


def test_replicas_that_come_and_go_are_followed(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE]
    with edge_for(replicas, upstream_resolve_interval=0.1) as edge, client() as http:
        assert set(answered_by(http, edge, 3)) == {ONE}
        replicas.addresses = [ONE, TWO]
        assert wait_until(lambda: TWO in answered_by(http, edge, 1), 5.0, interval=0.05)
        replicas.addresses = [TWO]
        # The address no longer resolved gets no requests, and its idle connection is closed.
        assert wait_until(lambda: servers[ONE].open_connections == 0, 5.0)
        answered = servers[ONE].answered("/")
        assert set(answered_by(http, edge, 5)) == {TWO}
        assert servers[ONE].answered("/") == answered


def test_addresses_are_kept_when_the_name_stops_resolving(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    with edge_for(replicas, upstream_resolve_interval=0.05) as edge, client() as http:
        assert set(answered_by(http, edge, 2)) == {ONE, TWO}
        replicas.addresses = []
        resolved = replicas.resolutions
        assert wait_until(lambda: replicas.resolutions >= resolved + 2, 5.0)
        assert sorted(answered_by(http, edge, 4)) == [ONE, ONE, TWO, TWO]


# -- readiness -------------------------------------------------------------------------------------


def ready(edge: RunningEdge) -> httpx.Response:
    response = httpx.get(edge.url + "/_edge/ready", trust_env=False, timeout=10.0)
    assert "127.0.0" not in response.text
    assert str(edge.proxy.pool.origin.port) not in response.text
    return response


def test_ready_names_states_only(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = [ONE, TWO]
    with edge_for(replicas) as edge:
        response = ready(edge)
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "checks": {"upstream": "up", "rate_limit_store": "up"}}
        servers[TWO].stop()
        response = ready(edge)
        assert response.status_code == 200  # one address answering is enough
        assert response.json()["checks"]["upstream"] == "degraded"
        servers[ONE].stop()
        response = ready(edge)
        assert response.status_code == 503
        assert response.json()["checks"]["upstream"] == "down"


def test_ready_is_down_while_the_name_has_never_resolved(replicas: Replicas, servers: ReplicaSet) -> None:
    replicas.addresses = []
    with edge_for(replicas) as edge:
        response = ready(edge)
        assert response.status_code == 503
        assert response.json()["checks"]["upstream"] == "down"
        assert httpx.get(edge.url + "/", trust_env=False).status_code == 502
        replicas.addresses = [ONE]
        assert ready(edge).json()["checks"]["upstream"] == "up"


# -- the system resolver ------------------------------------------------------------------------------


def test_a_name_is_resolved_by_the_system_resolver(replicas: Replicas, servers: ReplicaSet) -> None:
    with running_edge(f"http://localhost:{replicas.port}") as edge, client() as http:
        assert answered_by(http, edge, 3) == [ONE] * 3  # localhost is 127.0.0.1 here
