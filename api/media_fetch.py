"""Fetched media stay outside: a vLLM media connector that refuses non-public addresses.

A media URL in a request (`image_url`, `audio_url`, `video_url`) makes the server open a connection.
Left open, any client could make the server call addresses on its own host or network (its
/metrics, a cloud metadata service, an internal admin page). vLLM's `--allowed-media-domains` limits
names, not addresses. This connector, registered with vLLM's `MEDIA_CONNECTOR_REGISTRY` and chosen
through vLLM's own `VLLM_MEDIA_CONNECTOR` setting, fetches like vLLM's but

- resolves every host itself and refuses the request (a 400, `VLLMValidationError`) if *any* address a
  name resolves to is loopback, private, link-local, shared, reserved, multicast or unspecified; the
  connection then goes to the checked addresses only (no second lookup that could answer otherwise);
- does so for every hop of a redirect (aiohttp resolves each hop's name through the same resolver; a
  literal IP is checked at the request's start and at each redirect, before the next hop connects);
- answers a `file://` URL without `--allowed-local-media-path` with a 400 instead of vLLM's 500.

`--allow-private-media-urls` (env `OMNI_VLLM_ALLOW_PRIVATE_MEDIA_URLS=1`) turns the address check off;
`OMNI_VLLM_ALLOWED_MEDIA_NETWORKS` (comma-separated CIDRs, e.g. an internal media store's subnet)
opens chosen networks only. vLLM's `--allowed-media-domains` applies as before.

The synchronous path (offline `LLM.chat` with media URLs) checks each hop's addresses before the
request is sent; there the connection resolves the name again (requests offers no resolver hook).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any

import aiohttp
import requests
import yarl
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from urllib3.util import parse_url
from vllm.connections import HTTPConnection
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector

CONNECTOR_NAME = "omni_vllm_public"
ENV_ALLOW_PRIVATE = "OMNI_VLLM_ALLOW_PRIVATE_MEDIA_URLS"
ENV_ALLOWED_NETWORKS = "OMNI_VLLM_ALLOWED_MEDIA_NETWORKS"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _networks(spec: str | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(s.strip(), strict=False)
        for s in (spec or "").split(",")
        if s.strip()
    ]


class AddressPolicy:
    """Which addresses media may be fetched from: public ones, plus any `allowed` networks."""

    def __init__(self, allow_private: bool = False, allowed: Iterable[str] = ()):
        self.allow_private = allow_private
        self.allowed = _networks(",".join(allowed))

    @classmethod
    def from_env(cls) -> AddressPolicy:
        return cls(
            os.environ.get(ENV_ALLOW_PRIVATE, "") not in ("", "0", "false"),
            [os.environ.get(ENV_ALLOWED_NETWORKS, "")],
        )

    def refusal(self, host: str, address: str) -> str | None:
        """Why `address` (of `host`) may not be fetched from, or None."""
        if self.allow_private:
            return None
        ip: Address = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed) or (
            ip.is_global and not ip.is_multicast
        ):
            return None
        kind = next(
            (
                k
                for k in (
                    "loopback",
                    "private",
                    "link_local",
                    "multicast",
                    "unspecified",
                    "reserved",
                )
                if getattr(ip, f"is_{k}")
            ),
            "non-public",
        ).replace("_", "-")
        return (
            f"media URL host {host!r} resolves to {ip}, a {kind} address: the server fetches media from "
            "public addresses only (start it with --allow-private-media-urls, or list the network in "
            f"{ENV_ALLOWED_NETWORKS}, to allow it)"
        )

    def check(self, host: str, addresses: Iterable[str]) -> None:
        for address in addresses:
            if (why := self.refusal(host, address)) is not None:
                raise VLLMValidationError(why, parameter="url", value=host)

    def check_literal(self, host: str | None) -> None:
        """A URL whose host is an IP literal is never resolved: check it as it is."""
        if host:
            try:
                ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
            except ValueError:
                return
            self.check(host, [host.strip("[]")])


class _CheckingResolver(AbstractResolver):
    """aiohttp resolver: the system's answer, refused whole if any address is not allowed."""

    def __init__(self, policy: AddressPolicy):
        self.policy, self._inner = policy, DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ):
        infos = await self._inner.resolve(host, port, family)
        self.policy.check(host, [i["host"] for i in infos])
        return infos

    async def close(self) -> None:
        await self._inner.close()


class _CheckingSession(requests.Session):
    """requests session that checks each hop's addresses before sending it (redirects included)."""

    def __init__(self, policy: AddressPolicy):
        super().__init__()
        self.policy = policy

    def send(
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        url = parse_url(request.url)
        host, port = url.host or "", url.port or (443 if url.scheme == "https" else 80)
        self.policy.check_literal(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise requests.ConnectionError(e) from e
        self.policy.check(host, [info[4][0] for info in infos])
        return super().send(request, **kwargs)


class PublicOnlyHTTPConnection(HTTPConnection):
    """vLLM's HTTPConnection whose clients refuse non-public addresses (see the module docstring)."""

    def __init__(self, policy: AddressPolicy | None = None):
        super().__init__(reuse_client=True)
        self.policy = policy

    def _policy(self) -> AddressPolicy:
        return self.policy or AddressPolicy.from_env()

    def get_sync_client(self) -> requests.Session:
        if self._sync_client is None:
            self._sync_client = _CheckingSession(self._policy())
        return self._sync_client

    async def get_async_client(self) -> aiohttp.ClientSession:
        if self._async_client is None or self._async_client.closed:
            policy = self._policy()

            async def on_request_start(session, ctx, params) -> None:
                policy.check_literal(params.url.host)

            async def on_request_redirect(
                session, ctx, params
            ) -> None:  # before the next hop
                location = params.response.headers.get("Location")
                if location:
                    policy.check_literal(params.url.join(yarl.URL(location)).host)

            trace = aiohttp.TraceConfig()
            trace.on_request_start.append(on_request_start)
            trace.on_request_redirect.append(on_request_redirect)
            # trust_env=False: with a proxy from the environment the proxy, not this check, would pick
            # the address; deployments behind one use --allow-private-media-urls.
            self._async_client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=_CheckingResolver(policy)),
                trace_configs=[trace],
            )
        return self._async_client


_connection = PublicOnlyHTTPConnection()


class PublicMediaConnector(MediaConnector):
    """vLLM's MediaConnector over `PublicOnlyHTTPConnection`, with a 400 for unallowed file URLs."""

    def __init__(
        self, media_io_kwargs=None, connection: HTTPConnection | None = None, **kwargs
    ):
        super().__init__(media_io_kwargs, connection or _connection, **kwargs)

    def _load_file_url(self, url_spec, media_io):
        if self.allowed_local_media_path is None:
            raise VLLMValidationError(
                "file:// media URLs are not allowed on this server (vLLM's "
                "--allowed-local-media-path is not set)",
                parameter="url",
            )
        return super()._load_file_url(url_spec, media_io)


def register() -> None:
    """Make the connector available as `VLLM_MEDIA_CONNECTOR=omni_vllm_public` (idempotent)."""
    from omni_vllm.api.compat import check_media_connector

    check_media_connector(MediaConnector)  # we override its private _load_file_url
    MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)(PublicMediaConnector)
