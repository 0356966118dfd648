"""pushsvc: long LLM jobs in the background, progress pushed to browsers over SSE."""

from __future__ import annotations

__version__ = "0.1.0"
