"""The token dance (unit level, no network): httpx.MockTransport plays registry and realm.

The fake-upstream tests in tests/proxy cover the same flow over real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest

from moorage.upstreams import UpstreamAuthFailed, UpstreamProtocolError, UpstreamRateLimited, UpstreamUnavailable
from moorage.upstreams._auth import RegistryAuth, parse_challenge, scope_for_path

REGISTRY = "https://registry.test"
CHALLENGE = 'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:library/alpine:pull"'


class Upstream:
    """A registry that wants a Bearer token, and its token service; counts token fetches.
    ``answer``, when set, is what the token service sends instead of a token."""

    def __init__(self, expires_in: object = 300, challenge: str = CHALLENGE) -> None:
        self.tokens_issued = 0
        self.expires_in = expires_in
        self.challenge = challenge
        self.answer: bytes | None = None
        self.valid: set[str] = set()
        self.token_requests: list[httpx.Request] = []
        self.challenged = 0  # 401s sent
        self.hold_401 = asyncio.Event()
        self.hold_401.set()
        #: A request to ``…/held`` has arrived and waits for ``hold_401``.
        self.holding = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            self.token_requests.append(request)
            if self.answer is not None:
                return httpx.Response(200, content=self.answer)
            self.tokens_issued += 1
            token = f"t{self.tokens_issued}"
            self.valid.add(token)
            body: dict[str, object] = {"token": token}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return httpx.Response(200, json=body)
        auth = request.headers.get("authorization", "")
        if auth.removeprefix("Bearer ") in self.valid:
            return httpx.Response(200, content=b"ok")
        if request.url.path.endswith("/held"):
            self.holding.set()
            await self.hold_401.wait()
        self.challenged += 1
        return httpx.Response(401, headers={"WWW-Authenticate": self.challenge})


def make(upstream: Upstream, credentials: tuple[str, str] | None = None) -> tuple[httpx.AsyncClient, RegistryAuth]:
    transport = httpx.MockTransport(upstream)
    token_client = httpx.AsyncClient(transport=transport)
    auth = RegistryAuth("registry.test", httpx.URL(REGISTRY), token_client, credentials)
    return httpx.AsyncClient(base_url=REGISTRY, transport=transport, auth=auth), auth


async def test_concurrent_requests_share_one_token_fetch() -> None:
    upstream = Upstream()
    client, _ = make(upstream)
    responses = await asyncio.gather(*(client.get("/v2/library/alpine/manifests/3.19") for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert upstream.tokens_issued == 1
    assert (await client.get("/v2/library/alpine/blobs/sha256:x")).status_code == 200
    assert upstream.tokens_issued == 1


async def test_a_token_for_the_registrys_own_scope_is_sent_up_front_next_time() -> None:
    """public.ecr.aws challenges with scope "aws", not the repository's: its token was kept
    under that scope and looked for under the path's, so every request was sent bare first
    and refused, twice the requests to a registry that allows anonymous clients 1/s."""
    upstream = Upstream(challenge='Bearer realm="https://auth.test/token",service="public.ecr.aws",scope="aws"')
    client, auth = make(upstream)
    assert (await client.get("/v2/docker/library/alpine/manifests/3.19")).status_code == 200
    assert upstream.challenged == 1 and upstream.token_requests[0].url.params["scope"] == "aws"
    assert (await client.get("/v2/docker/library/alpine/manifests/3.19")).status_code == 200
    assert (await client.get("/v2/docker/library/alpine/blobs/sha256:x")).status_code == 200
    for number in range(20):  # other repositories too, and no entry of their own each
        assert (await client.get(f"/v2/team/app-{number}/manifests/1")).status_code == 200
    assert upstream.challenged == 1 and upstream.tokens_issued == 1
    assert list(auth._tokens) == ["aws"]


class PerPath(Upstream):
    """A registry whose challenge names the scope of the path asked for, as Docker Hub's does."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "auth.test":
            name = request.url.path.removeprefix("/v2/").rsplit("/", 2)[0]
            self.challenge = (
                f'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:{name}:pull"'
            )
        return await super().__call__(request)


async def test_a_scope_whose_token_expired_gets_another_before_it_goes() -> None:
    """Sent bare once its token had expired (5 minutes on Docker Hub), each request was refused
    and sent again: a 401 and one more request to the registry at every expiry, a round trip
    more for nearly every revalidation of a stale tag."""
    upstream = PerPath(expires_in=1)
    client, _ = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    assert (await client.get("/v2/library/busybox/manifests/1")).status_code == 200
    assert upstream.challenged == 2, "a scope's first request goes bare: it may need no token"
    await asyncio.sleep(1.0)  # their tokens expired (kept 0.9 s of 1)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    assert (await client.get("/v2/library/busybox/manifests/2")).status_code == 200
    assert upstream.challenged == 2, "no 401 once a scope's token service is known"
    assert [request.url.params["scope"] for request in upstream.token_requests[-2:]] == [
        "repository:library/alpine:pull",
        "repository:library/busybox:pull",
    ]


class Mixed(Upstream):
    """A registry that serves ``public/*`` with no token and sends each other namespace to a
    token service of its own (``https://auth.test/<namespace>``); ``services_down`` fails them."""

    services_down = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test" and self.services_down:
            return httpx.Response(503)
        if request.url.host == "auth.test":
            assert request.url.params["scope"].startswith(f"repository:{request.url.path.strip('/')}/")
            return await super().__call__(request)
        path = request.url.path
        if path.startswith("/v2/public/"):
            return httpx.Response(200, content=b"ok")
        namespace = path.split("/")[2]
        self.challenge = f'Bearer realm="https://auth.test/{namespace}",service="registry.test"'
        return await super().__call__(request)


async def test_a_repository_served_without_a_token_or_by_another_token_service_is_asked_as_before() -> None:
    """The token service is learnt per scope: a public repository beside challenged ones, or a
    namespace with a token service of its own, was sent for a token it did not need or could
    not get, and failed where it had been served."""
    upstream = Mixed(expires_in=1)
    client, _ = make(upstream)
    assert (await client.get("/v2/team-a/app/manifests/1")).status_code == 200
    assert (await client.get("/v2/team-b/app/manifests/1")).status_code == 200
    upstream.services_down = True
    assert (await client.get("/v2/public/app/manifests/1")).status_code == 200
    assert [request.url.path for request in upstream.token_requests] == ["/team-a", "/team-b"]
    await asyncio.sleep(1.0)  # both tokens expired, and their token services are down
    assert (await client.get("/v2/public/other/manifests/1")).status_code == 200
    with pytest.raises(UpstreamUnavailable):  # bare, refused, no token to be had: as before
        await client.get("/v2/team-a/app/manifests/1")


async def test_a_registry_scope_is_fetched_ahead_once_for_every_repository() -> None:
    """public.ecr.aws's tokens are for its scope "aws", not a repository's: fetched ahead per
    repository, each expiry had cost a token per repository against a registry that allows
    anonymous clients about one request a second."""
    upstream = Upstream(
        expires_in=1, challenge='Bearer realm="https://auth.test/token",service="public.ecr.aws",scope="aws"'
    )
    client, auth = make(upstream)
    for _ in range(2):
        for number in range(5):
            assert (await client.get(f"/v2/team/app-{number}/manifests/1")).status_code == 200
        await asyncio.sleep(1.0)  # the token expired
    assert [request.url.params["scope"] for request in upstream.token_requests] == ["aws", "aws"]
    assert upstream.challenged == 1 and list(auth._tokens) == ["aws"]


async def test_a_registry_scope_that_expired_serves_repositories_never_challenged_without_a_401() -> None:
    """Repositories served with the registry's own scope's token, never challenged themselves,
    went bare once it expired: at once, a 401 and a second request each, at a registry that
    allows anonymous clients about one request a second."""
    upstream = Upstream(
        expires_in=1, challenge='Bearer realm="https://auth.test/token",service="public.ecr.aws",scope="aws"'
    )
    client, _ = make(upstream)
    for number in range(20):
        assert (await client.get(f"/v2/team/app-{number}/manifests/1")).status_code == 200
    assert upstream.challenged == 1
    await asyncio.sleep(1.0)  # the token expired
    answers = await asyncio.gather(*(client.get(f"/v2/team/app-{n}/manifests/1") for n in range(1, 20)))
    assert [answer.status_code for answer in answers] == [200] * 19
    assert upstream.challenged == 1 and len(upstream.token_requests) == 2


async def test_a_challenge_naming_another_scope_is_asked_for_that_scope_ahead() -> None:
    """A registry whose challenge names a scope other than the path's: the token is the
    challenge's, and so is the one fetched ahead (the path's was refused by its token service)."""
    upstream = Upstream(expires_in=1)  # challenges always name library/alpine
    client, _ = make(upstream)
    for _ in range(3):
        assert (await client.get("/v2/alpine/manifests/1")).status_code == 200
        await asyncio.sleep(1.0)
    assert {request.url.params["scope"] for request in upstream.token_requests} == {"repository:library/alpine:pull"}
    assert upstream.challenged == 1


async def test_a_failing_token_service_is_asked_once_per_request() -> None:
    """A token service that fails when a token expired was asked ahead, then once more after
    the bare request's 401: twice the wait for one that hangs, twice the requests to one that
    limits them."""
    upstream = PerPath(expires_in=1)
    client, _ = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    await asyncio.sleep(1.0)  # the token expired
    upstream.answer = b"<html>bad gateway</html>"  # the token service answers no token
    asked = len(upstream.token_requests)
    with pytest.raises(UpstreamProtocolError):
        await client.get("/v2/library/alpine/manifests/1")
    assert len(upstream.token_requests) - asked == 1
    assert upstream.challenged == 2, "sent bare after the failure: a registry that asks no token serves it"


class StoppedAsking(PerPath):
    """A registry that stops asking for tokens (moved to htpasswd or to anonymous pulls) while
    its old token service still answers, refusing: ``stopped``."""

    stopped = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.stopped and request.url.host == "auth.test":
            self.token_requests.append(request)
            return httpx.Response(401, json={"details": "no such user"})
        if self.stopped:
            return httpx.Response(200, content=b"ok")
        return await super().__call__(request)


@pytest.mark.parametrize("credentials", [None, ("robot", "s3cret")], ids=["anonymous", "credentials"])
async def test_a_registry_that_stops_asking_for_tokens_is_served_bare(credentials: tuple[str, str] | None) -> None:
    """A token fetched ahead from the old token service was refused, and the refusal failed
    every request the registry would have served (with credentials, holding them as refused
    and logging so); each request waited for the token service first, for good."""
    upstream = StoppedAsking(expires_in=1)
    client, auth = make(upstream, credentials)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    await asyncio.sleep(1.0)  # the token expired
    upstream.stopped = True
    for _ in range(3):
        assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    assert len(upstream.token_requests) == 2, "asked once ahead; served bare, it is asked no more"
    assert auth._holding("repository:library/alpine:pull") is None and auth._holding(None) is None


class StoppedAskingForItsScope(StoppedAsking):
    """As ``StoppedAsking``, for a registry whose challenges named a scope of its own."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.stopped and request.url.host != "auth.test":
            return await Upstream.__call__(self, request)  # the challenge given: "aws"
        return await super().__call__(request)


async def test_a_registry_that_stops_asking_for_its_own_scope_s_token_is_asked_no_more() -> None:
    upstream = StoppedAskingForItsScope(
        expires_in=1, challenge='Bearer realm="https://auth.test/token",service="public.ecr.aws",scope="aws"'
    )
    client, _ = make(upstream)
    assert (await client.get("/v2/team/app-0/manifests/1")).status_code == 200
    await asyncio.sleep(1.0)  # the token expired
    upstream.stopped = True
    for number in range(1, 4):  # repositories never challenged: the registry scope's token ahead
        assert (await client.get(f"/v2/team/app-{number}/manifests/1")).status_code == 200
    assert len(upstream.token_requests) == 2, "asked once ahead; served bare, it is asked no more"


async def test_a_registry_failing_bare_after_a_failure_ahead_is_still_asked_for_tokens() -> None:
    """A 5xx to the bare request says nothing of tokens: the scope's token service is kept."""
    upstream = StoppedAsking(expires_in=1)
    client, auth = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    await asyncio.sleep(1.0)  # the token expired
    upstream.answer = b"no token"  # the token service fails ahead
    calls = upstream.__call__

    async def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503) if request.url.host != "auth.test" else await calls(request)

    client._transport = httpx.MockTransport(down)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 503
    assert "repository:library/alpine:pull" in auth._token_services


class Revoked(PerPath):
    """A registry whose token service refuses the credentials once ``revoked``."""

    revoked = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.revoked and request.url.host == "auth.test":
            self.token_requests.append(request)
            return httpx.Response(401, json={"details": "incorrect username or password"})
        return await super().__call__(request)


@pytest.mark.logs_errors("the upstream refused the configured credentials")
async def test_credentials_refused_ahead_are_held_once_the_registry_asks_for_a_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refused ahead, the credentials are held only once the registry's challenge says a token
    is needed; then as always, and said once, so a registry that locks accounts after failed
    sign-ins does not lock the cache's."""
    upstream = Revoked(expires_in=1)
    client, _ = make(upstream, ("robot", "s3cret"))
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    await asyncio.sleep(1.0)  # the token expired; the credentials were revoked meanwhile
    upstream.revoked = True
    asked = len(upstream.token_requests)
    for _ in range(3):
        with pytest.raises(UpstreamAuthFailed):
            await client.get("/v2/library/alpine/manifests/1")
    assert len(upstream.token_requests) - asked == 1, "asked ahead once, then held"
    refused = [r for r in caplog.records if r.getMessage() == "the upstream refused the configured credentials"]
    assert len(refused) == 1


async def test_a_late_401_uses_the_token_another_request_fetched() -> None:
    upstream = Upstream()
    client, _ = make(upstream)
    upstream.hold_401.clear()
    late = asyncio.ensure_future(client.get("/v2/library/alpine/manifests/held"))
    await asyncio.wait_for(upstream.holding.wait(), 10)  # the late request, sent bare, waits for its 401
    first = await client.get("/v2/library/alpine/manifests/2")  # fetches the token meanwhile
    upstream.hold_401.set()
    assert first.status_code == 200 and (await late).status_code == 200
    assert upstream.tokens_issued == 1


class Unheld(PerPath):
    """Docker Hub for a name it does not have: a token is granted, and refused there."""

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != "auth.test" and "/ghost/" in request.url.path:
            self.challenged += 1
            challenge = 'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:ghost:pull"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge + ',error="insufficient_scope"'})
        return await super().__call__(request)


async def test_a_token_fetched_ahead_and_refused_is_not_fetched_again_for_the_same_request() -> None:
    """The token fetched for this very request from the service its challenge names: a second
    fetch gets the same refusal, a token service round trip more at each expiry."""
    upstream = Unheld(expires_in=1)
    client, _ = make(upstream)
    assert (await client.get("/v2/ghost/manifests/1")).status_code == 401
    assert (len(upstream.token_requests), upstream.challenged) == (1, 2)  # bare, then with a token
    await asyncio.sleep(1.0)  # expired
    assert (await client.get("/v2/ghost/manifests/1")).status_code == 401
    assert (len(upstream.token_requests), upstream.challenged) == (2, 3), "one token, one request"


class GrantsAsked(PerPath):
    """Each token grants the repository it was asked for, and no other (as Distribution's)."""

    def __init__(self) -> None:
        super().__init__()
        self.granted: dict[str, str] = {}
        self.sent_for_another = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            response = await super().__call__(request)
            self.granted[f"t{self.tokens_issued}"] = request.url.params["scope"].split(":")[1]
            return response
        name = request.url.path.removeprefix("/v2/").rsplit("/", 2)[0]
        granted = self.granted.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if granted is not None and granted != name:
            self.sent_for_another += 1
            self.challenged += 1
            challenge = f'Bearer realm="https://auth.test/token",service="registry.test",scope="repository:{name}:pull"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return await super().__call__(request)


async def test_a_repository_with_a_component_named_blobs_or_tags_has_a_token_of_its_own() -> None:
    """``acme/blobs`` read as ``acme`` (the first ``/blobs/`` of the path): the two shared one
    token, each request sent the other's and refused, and sent again."""
    assert scope_for_path("/v2/acme/blobs/manifests/1") == "repository:acme/blobs:pull"
    assert scope_for_path("/v2/acme/tags/blobs/sha256:x") == "repository:acme/tags:pull"
    assert scope_for_path("/v2/acme/manifests/app/tags/list") == "repository:acme/manifests/app:pull"
    upstream = GrantsAsked()
    client, _ = make(upstream)
    for _ in range(5):
        assert (await client.get("/v2/acme/manifests/1")).status_code == 200
        assert (await client.get("/v2/acme/blobs/manifests/1")).status_code == 200
    assert upstream.sent_for_another == 0 and upstream.challenged == 2


async def test_a_refused_token_is_replaced_once() -> None:
    upstream = Upstream()
    client, _ = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    upstream.valid.clear()  # revoked upstream
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    assert upstream.tokens_issued == 2


async def test_missing_expires_in_means_60_seconds() -> None:
    upstream = Upstream(expires_in=None)
    client, auth = make(upstream)
    await client.get("/v2/library/alpine/manifests/1")
    _, expires_at = auth._tokens["repository:library/alpine:pull"]
    assert 50 <= expires_at - time.monotonic() <= 60


@pytest.mark.parametrize("expires_in", ["abc", 1e400, None, -5, 0, True, [300]])
async def test_an_expires_in_that_is_no_number_means_60_seconds(expires_in: object) -> None:
    upstream = Upstream()
    upstream.answer = (
        b'{"token": "t1", "expires_in": ' + json.dumps(expires_in).encode().replace(b"Infinity", b"1e400") + b"}"
    )
    upstream.valid.add("t1")
    client, auth = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    _, expires_at = auth._tokens["repository:library/alpine:pull"]
    assert 50 <= expires_at - time.monotonic() <= 60


@pytest.mark.parametrize(("expires_in", "kept"), [(20, 18.0), (1, 0.9), ("300", 290.0), (7.5, 6.75)])
async def test_a_token_is_kept_as_long_as_its_expires_in_says(expires_in: object, kept: float) -> None:
    """Less than the spec's 60 s is what the token service means: kept 60 s, a token given for
    20 was sent expired for 40, each request refused once before a new token. A number sent
    as a string was taken for no number at all."""
    upstream = Upstream(expires_in=expires_in)
    client, auth = make(upstream)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 200
    _, expires_at = auth._tokens["repository:library/alpine:pull"]
    assert kept - 1 <= expires_at - time.monotonic() <= kept


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        pytest.param(b'["t1"]', "other than a JSON object", id="a_list"),
        pytest.param(b'{"token": 7}', "without a token", id="not_a_string"),
        pytest.param(b'{"token": "' + b"x" * 70_000 + b'"}', "more than 65536 bytes", id="too_large"),
        # A token read from a file with its newline: h11 would quote the header, token and all.
        pytest.param(b'{"token": "s3cret-token\\n"}', "a token no header can carry", id="control_character"),
    ],
)
async def test_a_token_answer_that_is_no_token_is_refused_cleanly(answer: bytes, problem: str) -> None:
    upstream = Upstream()
    upstream.answer = answer
    client, _ = make(upstream)
    with pytest.raises(UpstreamProtocolError, match=problem) as refused:
        await client.get("/v2/library/alpine/manifests/1")
    assert "s3cret" not in str(refused.value)


async def test_a_429_from_the_token_service_is_a_rate_limit_with_its_retry_after() -> None:
    """auth.docker.io throttles too: a 429 there is the registry's limit, not an outage, so
    the client hears 429 and the retries wait as they are told."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            return httpx.Response(429, headers={"Retry-After": "60"})
        return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})

    transport = httpx.MockTransport(handler)
    auth = RegistryAuth("registry.test", httpx.URL(REGISTRY), httpx.AsyncClient(transport=transport))
    client = httpx.AsyncClient(base_url=REGISTRY, transport=transport, auth=auth)
    with pytest.raises(UpstreamRateLimited) as limited:
        await client.get("/v2/library/alpine/manifests/1")
    assert limited.value.retry_after == 60


async def test_credentials_never_go_to_a_plain_http_token_service_of_an_https_registry() -> None:
    upstream = Upstream(challenge=CHALLENGE.replace("https://auth.test", "http://auth.test"))
    client, _ = make(upstream, credentials=("bob", "hunter2"))
    with pytest.raises(UpstreamAuthFailed, match="token service at a plain http URL: credentials not sent"):
        await client.get("/v2/library/alpine/manifests/1")
    assert upstream.token_requests == []
    anonymous, _ = make(upstream)  # nothing to keep from it: anonymous tokens are fetched there
    upstream.valid.add("t1")
    assert (await anonymous.get("/v2/library/alpine/manifests/1")).status_code == 200


async def test_credentials_go_to_the_token_service_as_basic() -> None:
    upstream = Upstream()
    client, _ = make(upstream, ("bob", "hunter2"))
    await client.get("/v2/library/alpine/manifests/1")
    sent = upstream.token_requests[0]
    assert sent.headers["authorization"] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    assert sent.url.params["scope"] == "repository:library/alpine:pull"
    assert sent.url.params["service"] == "registry.test"


async def test_basic_challenge_sends_credentials() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        if request.headers.get("authorization", "").startswith("Basic "):
            return httpx.Response(200)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    transport = httpx.MockTransport(handler)
    auth = RegistryAuth("r", httpx.URL(REGISTRY), httpx.AsyncClient(transport=transport), ("u", "p"))
    client = httpx.AsyncClient(base_url=REGISTRY, transport=transport, auth=auth)
    assert (await client.get("/v2/a/manifests/1")).status_code == 200
    assert (await client.get("/v2/a/manifests/2")).status_code == 200
    assert seen[0] == "" and seen[1].startswith("Basic ") and seen[2].startswith("Basic ")


async def test_a_401_from_another_host_is_not_ours_to_answer() -> None:
    upstream = Upstream()
    transport = httpx.MockTransport(upstream)
    auth = RegistryAuth("registry.test", httpx.URL("https://other.test"), httpx.AsyncClient(transport=transport))
    client = httpx.AsyncClient(base_url=REGISTRY, transport=transport, auth=auth)
    assert (await client.get("/v2/library/alpine/manifests/1")).status_code == 401
    assert upstream.tokens_issued == 0


@pytest.mark.parametrize(
    ("header", "scheme", "params"),
    [
        (
            CHALLENGE,
            "bearer",
            {"realm": "https://auth.test/token", "service": "registry.test", "scope": "repository:library/alpine:pull"},
        ),
        ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
        ("Bearer realm=https://x/token,service=x", "bearer", {"realm": "https://x/token", "service": "x"}),
        # Two challenges on one line, or on two lines that httpx joins with a comma: Bearer wins,
        # with its own realm (Basic's had overwritten it), a comma in a quoted value kept.
        (
            'Basic realm="Registry Realm", Bearer realm="https://x/token?a=1,2",service="x"',
            "bearer",
            {"realm": "https://x/token?a=1,2", "service": "x"},
        ),
        (
            'Bearer realm="https://x/token",service="x", Basic realm="Registry Realm"',
            "bearer",
            {"realm": "https://x/token", "service": "x"},
        ),
        ('Negotiate, Basic realm="r"', "basic", {"realm": "r"}),
        ("", "", {}),
    ],
)
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert parse_challenge(header) == (scheme, params)


def test_scope_for_path() -> None:
    assert scope_for_path("/v2/library/alpine/manifests/1") == "repository:library/alpine:pull"
    assert scope_for_path("/prefix/v2/a/b/blobs/sha256:x") == "repository:a/b:pull"
    assert scope_for_path("/v2/") is None


@pytest.mark.logs_errors("the upstream refused the configured credentials")
def test_refusals_in_flight_when_a_hold_begins_neither_lengthen_it_nor_end_it() -> None:
    """Eight pulls at once met a wrong password: the hold doubled at each, to 15 minutes, with
    eight error lines; and a pull sent before the refusal that then succeeded (a cached token)
    ended the hold at once. Each request the hold answers gets an error of its own: one shared
    error gathered every request's traceback, 33 MB after 5,000."""
    auth = RegistryAuth("r", httpx.URL(REGISTRY), httpx.AsyncClient(), ("u", "p"))
    sent_before = auth._refusals
    first = auth._refused(None, "refused", 401)
    for _ in range(7):
        auth._refused(None, "refused", 401)
    assert "not sent again for 30 s" in str(first)
    assert auth._next_hold[None] == 60.0, "one refusal in a row, not eight"
    auth._accepted(None, sent_before)
    held, again = auth._holding(None), auth._holding(None)
    assert held is not None and again is not None and held is not again
    auth._accepted(None, auth._refusals)  # sent after the refusal, and granted
    assert auth._holding(None) is None


@pytest.mark.logs_errors("the upstream refused the configured credentials")
def test_a_token_refused_for_one_repository_holds_that_repository_alone() -> None:
    """A token service answers per repository: a scope the account may not read held every
    pull from the upstream."""
    auth = RegistryAuth("r", httpx.URL(REGISTRY), httpx.AsyncClient(), ("u", "p"))
    auth._token_refused(403, "repository:team/b:pull")
    assert auth._holding("repository:team/b:pull") is not None
    assert auth._holding("repository:team/a:pull") is None and auth._holding(None) is None
