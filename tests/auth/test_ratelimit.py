"""Failed-login limits: per address and user, per address, windows, bounded memory."""

from __future__ import annotations

from regproxy.auth.ratelimit import LoginLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_per_address_and_user() -> None:
    clock = Clock()
    limiter = LoginLimiter(3, 60.0, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", "bob") == 0
        limiter.failed("10.0.0.1", "bob")
    assert limiter.retry_after("10.0.0.1", "bob") == 60.0
    assert limiter.retry_after("10.0.0.2", "bob") == 0  # another address
    assert limiter.retry_after("10.0.0.1", "carol") == 0  # another user
    clock.now += 59
    assert limiter.retry_after("10.0.0.1", "bob") == 1.0
    clock.now += 1
    assert limiter.retry_after("10.0.0.1", "bob") == 0


def test_success_resets_the_user_count() -> None:
    limiter = LoginLimiter(3, 60.0, clock=Clock())
    limiter.failed("a", "bob")
    limiter.failed("a", "bob")
    limiter.succeeded("a", "bob")
    limiter.failed("a", "bob")
    limiter.failed("a", "bob")
    assert limiter.retry_after("a", "bob") == 0


def test_one_address_guessing_many_users_is_locked_out() -> None:
    limiter = LoginLimiter(3, 60.0, address_factor=2, clock=Clock())
    for user in ("u1", "u2", "u3", "u4", "u5", "u6"):
        assert limiter.retry_after("a", user) == 0
        limiter.failed("a", user)
    assert limiter.retry_after("a", "u7") > 0
    assert limiter.retry_after("b", "u7") == 0


def test_memory_is_bounded() -> None:
    limiter = LoginLimiter(3, 60.0, max_entries=100, clock=Clock())
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert len(limiter) <= 100
    # the most recent keys are the ones kept
    for _ in range(2):
        limiter.failed("10.0.39.15", "user9999")
    assert limiter.retry_after("10.0.39.15", "user9999") > 0
