"""A machine without a network, for tests: Python loads this module at start-up when this folder
is on PYTHONPATH. Every connection or name look-up for a host other than this machine fails,
and is logged to the file named by $TUNELAB_NONET_LOG (a library that catches the error and
carries on must still be seen to have tried)."""

import ipaddress
import os
import socket


class NetworkBlocked(OSError):
    pass


def _is_loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, host) -> None:
    log = os.environ.get("TUNELAB_NONET_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{what} {host!r}\n")
    raise NetworkBlocked(f"no network in this test: {what} {host!r}")


def _guard(original, what: str, host_of):
    def guarded(*args, **kwargs):
        host = host_of(*args, **kwargs)
        if not _is_loopback(host):
            _refuse(what, host)
        return original(*args, **kwargs)

    return guarded


def _socket_host(sock, address, *args, **kwargs):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return address[0]
    return None  # Unix sockets stay on the machine


socket.socket.connect = _guard(socket.socket.connect, "connect", _socket_host)
socket.socket.connect_ex = _guard(socket.socket.connect_ex, "connect", _socket_host)
socket.create_connection = _guard(socket.create_connection, "create_connection", lambda address, *a, **k: address[0])
socket.getaddrinfo = _guard(socket.getaddrinfo, "getaddrinfo", lambda host, *a, **k: host)
