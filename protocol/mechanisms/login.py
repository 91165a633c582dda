"""LOGIN: the server prompts `Username:` then `Password:`, each answered in turn."""

from __future__ import annotations

from protocol.mechanisms.base import (
    Challenge,
    Environment,
    Failure,
    Mechanism,
    NeedPassword,
    NeedUsername,
    Step,
)

USERNAME_PROMPT = b"Username:"
PASSWORD_PROMPT = b"Password:"


class Login(Mechanism):
    name = "LOGIN"
    flags = ("plaintext",)

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self._username: bytes | None = None

    def initial(self, data: bytes | None) -> Step:
        # A zero-length initial response still gets the user name prompt.
        if not data:
            return Challenge(USERNAME_PROMPT)
        return self.step(data)

    def step(self, data: bytes) -> Step:
        if self._username is None:
            self._username = data
            return NeedUsername(data)
        return NeedPassword(self._username, data)

    def username_result(self, accepted: bool) -> Step:
        if not accepted:
            return Failure("invalid user name")
        return Challenge(PASSWORD_PROMPT)
