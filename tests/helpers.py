"""Small helpers shared by test modules."""

import time


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05):
    """Polls `condition` until it returns something truthy (returned), or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
