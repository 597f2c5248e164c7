"""Whether downloads can work here, known within seconds.

A blocked network fails in different ways: a refused connection or a failed name lookup come
back at once, a firewall that drops packets leaves a download waiting for minutes. `unreachable`
opens one TCP connection to each host the URLs name (to the proxy instead when the environment
sets one for the scheme, as `requests` and `urllib` do) and gives up after `timeout` seconds, so
that a run without network stops at once with instructions rather than after a long wait.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Iterable

PROBE_TIMEOUT = 5.0  # seconds: longer than any healthy TCP handshake, short for a user waiting
DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def endpoint(url: str) -> tuple[str, int]:
  """(host, port) that a download of `url` connects to first: its proxy, if one is set for the
  scheme and the host is not exempt (no_proxy), else the URL's own host."""
  parts = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
  return parts.hostname or "", parts.port or DEFAULT_PORTS.get(parts.scheme, 80)


def unreachable(urls: Iterable[str], timeout: float = PROBE_TIMEOUT) -> str:
  """'' when a TCP connection opens to every endpoint of `urls` (see `endpoint`) within
  `timeout` seconds, else why not for the first that fails, as 'host:port: reason'. Name
  lookups that hang are cut off too: the connections run in daemon threads."""
  endpoints = sorted({e for e in map(endpoint, urls) if e[0]})  # (a local path needs no network)
  results: dict[tuple[str, int], str] = {}

  def connect(host: str, port: int) -> None:
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      results[host, port] = ""
    except OSError as e:  # gaierror, ConnectionRefusedError, TimeoutError, ...
      results[host, port] = e.strerror or str(e) or type(e).__name__

  threads = [threading.Thread(target=connect, args=e, daemon=True) for e in endpoints]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + timeout
  for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
  for host, port in endpoints:
    why = results.get((host, port), f"no answer within {timeout:g} s")
    if why:
      return f"{host}:{port}: {why}"
  return ""
