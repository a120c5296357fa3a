"""A free TCP port on the loopback interface, for the tests that start servers or process groups."""

import socket


def free_port() -> int:
    """A port that nothing listens on now (another process may still take it before us)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
