"""Source platforms, one driver each, all answering the same verbs (see `base.Provider`)."""

from providers.base import Provider, get_provider, known_providers

__all__ = ["Provider", "get_provider", "known_providers"]
