"""A thin helper for Python users of a distillgame server, on the official ``openai`` SDK.

Everything a distillgame server speaks is the OpenAI API, so this module only
saves boilerplate: building a client for a base URL, waiting until the server
is ready, reading the caller's effective defense (``GET /v1/defense``) and
asking for next-token top-logprobs with token ids attached.

Not for: the attack harness's training loop (see ``clients/attack``), nor
anything that imports the server: this talks HTTP like any other client.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai


@dataclass
class DistillgameClient:
    """An ``openai.OpenAI`` client plus the few distillgame-specific calls."""

    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    timeout: float = 600.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        # The SDK insists on a key; an unauthenticated server ignores it.
        self.openai = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.api_key or "none",
            timeout=self.timeout, max_retries=self.max_retries,
        )

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 300.0, interval: float = 1.0) -> dict[str, Any]:
        """Poll ``/health`` until it answers 200; raise ``TimeoutError`` with the last answer."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=5)
                if r.status_code == 200:
                    return r.json()
                last = r.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(interval)
        raise TimeoutError(f"server at {self.base_url} not ready after {timeout:.0f}s: {last}")

    def model(self) -> str:
        """The id of the (single) served model."""
        return self.openai.models.list().data[0].id

    def defense(self) -> dict[str, Any]:
        """The caller's effective policy: tier, ``mode`` and its parameters (``gamma``, ``lam``, ``eps``)."""
        r = httpx.get(f"{self.base_url}/v1/defense", headers=self._headers(), timeout=30)
        r.raise_for_status()
        return r.json()

    def chat(self, messages: list[dict[str, str]] | str, **kwargs: Any) -> str:
        """The first choice's text of a chat completion."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        response = self.openai.chat.completions.create(model=kwargs.pop("model", None) or self.model(),
                                                       messages=messages, **kwargs)
        return response.choices[0].message.content or ""

    def next_token_logprobs(self, prompt_ids: list[int], k: int = 5) -> dict[int, float]:
        """Top-``k`` released next-token log-probs after ``prompt_ids``, keyed by token id."""
        response = self.openai.completions.create(
            model=self.model(), prompt=prompt_ids, max_tokens=1, temperature=0.0, logprobs=k,
            extra_body={"return_tokens_as_token_ids": True},
        )
        top = response.choices[0].logprobs.top_logprobs[0]
        return {int(token.split(":", 1)[1]): value for token, value in top.items()}
