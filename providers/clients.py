"""The process's clients of a cloud, one set per configuration: SDK clients keep their
connection pools and their credentials cache (and renew) tokens, so every provider object
made for the same section shares them."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, SecretStr

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")


def _key(config: BaseModel, options: dict[str, Any]) -> str:
    """Every field of the section (secrets by their value: another key is another
    client) and the options the clients were made with."""
    fields = [(name, value.get_secret_value() if isinstance(value, SecretStr) else value)
              for name, value in config]
    return hashlib.sha256(repr((fields, sorted(options.items()))).encode()).hexdigest()


class ClientCache(Generic[C, T]):
    """`make(config, **options)`, made once per configuration and options."""

    def __init__(self, make: Callable[..., T]) -> None:
        self._make = make
        self._made: dict[str, T] = {}
        self._lock = threading.Lock()

    def get(self, config: C, **options: Any) -> T:
        key = _key(config, options)
        with self._lock:
            if key not in self._made:
                self._made[key] = self._make(config, **options)
            return self._made[key]
