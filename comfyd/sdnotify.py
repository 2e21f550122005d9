"""A small sd_notify(3) client: tells systemd that comfyd is ready, alive, reloading or stopping.

No libsystemd: the protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines sent to the socket named by
``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace). Outside systemd the variable is
unset and every call is a cheap no-op, so callers never need to check.

Sending never blocks (the socket is non-blocking: a full queue drops the message) and never raises into the
caller. The first failure is logged once with the stdlib ``logging`` module; later ones only at debug level, so a
missing socket cannot flood the journal every watchdog period.

Typical use from the service's composition root::

    notifier = SystemdNotifier.from_env()
    ...  # open the database, start the actors, bind the port
    notifier.ready(status="serving on 127.0.0.1:9090")
    watchdog = asyncio.create_task(watchdog_loop(notifier, stop_event))
    ...  # on SIGTERM
    notifier.stopping(status="draining 3 running jobs")
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

__all__ = ["SystemdNotifier", "watchdog_loop"]


class SystemdNotifier:
    """Sends state notifications to the service manager.

    ``address`` is the raw ``NOTIFY_SOCKET`` value (``None`` or empty: disabled). ``watchdog_usec`` and
    ``watchdog_pid`` are the raw ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` values; use :meth:`from_env` to take all
    three from the environment.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self._address = address or None
        self._target: str | bytes | None = _socket_address(self._address)
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Builds a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        env = os.environ if env is None else env
        return cls(
            env.get("NOTIFY_SOCKET"),
            watchdog_usec=env.get("WATCHDOG_USEC"),
            watchdog_pid=env.get("WATCHDOG_PID"),
        )

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify (comfyd runs as a ``Type=notify`` service)."""
        return self._target is not None

    @property
    def address(self) -> str | None:
        return self._address

    # -- sending -----------------------------------------------------------------------------------------------

    def notify(self, **fields: object) -> bool:
        """Sends ``KEY=VALUE`` lines in the order given, e.g. ``notify(READY=1, STATUS="serving")``."""
        if not fields:
            return False
        return self.send("".join(f"{key}={_one_line(value)}\n" for key, value in fields.items()))

    def send(self, message: str) -> bool:
        """Sends one raw datagram. Returns whether it left this process; never raises."""
        if self._target is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8"), self._target)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN (queue full), EPERM from a sandbox, ...
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: OSError) -> None:
        if self._warned:
            logger.debug("sd_notify_failed socket=%s error=%s", self._address, exc)
            return
        self._warned = True
        logger.warning(
            "sd_notify_failed socket=%s error=%s (further failures are logged at debug level)",
            self._address, exc,
        )

    # -- the messages systemd understands ----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete: systemd marks the unit active and starts what is ordered after it."""
        return self.notify(READY=1, **_status(status))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive ping; with ``WatchdogSec=`` systemd kills the service when these stop."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (e.g. draining running jobs)."""
        return self.notify(STOPPING=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A configuration reload has begun; send :meth:`ready` when it is done.

        systemd >= 253 (``Type=notify-reload``) requires ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, in microseconds)
        with ``RELOADING=1``; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, **_status(status))

    def extend_timeout(self, usec: int) -> bool:
        """Asks for ``usec`` more microseconds for the current start-up, reload or stop (e.g. a long migration)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(usec))

    # -- watchdog ----------------------------------------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

        ``None`` when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer, or ``WATCHDOG_PID``
        naming another process (the variables were inherited from a parent).
        """
        raw = self._watchdog_usec
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            logger.warning("sd_watchdog_invalid WATCHDOG_USEC=%r", raw)
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                logger.warning("sd_watchdog_invalid WATCHDOG_PID=%r", self._watchdog_pid)
                return None
            if pid != os.getpid():
                return None
        return usec / 2 / 1_000_000

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> SystemdNotifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SystemdNotifier(address={self._address!r})"


async def watchdog_loop(
    notifier: SystemdNotifier, stop_event: asyncio.Event, interval: float | None = None
) -> None:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds (default: :meth:`~SystemdNotifier.watchdog_interval`).

    The pings come from the event loop itself, so a blocked or hung loop stops them and systemd restarts the
    service. Returns at once when there is no watchdog, and promptly once ``stop_event`` is set.
    """
    if interval is None:
        interval = notifier.watchdog_interval()
    if interval is None or interval <= 0 or not notifier.enabled:
        return
    while not stop_event.is_set():
        notifier.watchdog()
        try:
            await asyncio.wait_for(stop_event.wait(), interval)
        except TimeoutError:
            pass


def _socket_address(raw: str | None) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):  # abstract namespace: a leading NUL byte instead of the '@'
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # e.g. "vsock:CID:PORT" (systemd >= 254, for VMs): not something a host service is started with.
    logger.warning("sd_notify_unsupported NOTIFY_SOCKET=%r: only paths and @abstract names are supported", raw)
    return None


def _one_line(value: object) -> str:
    # A newline would start a new KEY=VALUE assignment; systemd shows STATUS on one line anyway.
    return str(value).replace("\n", " ")


def _status(status: str | None) -> dict[str, str]:
    return {} if status is None else {"STATUS": status}
