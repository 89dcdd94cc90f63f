"""The load generator's settings (conf/loadgen_app.yaml), validated before anything is sent."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paperclip.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


class LoadgenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "http://127.0.0.1:8080/v1"
    """The OpenAI base URL of a node (its coordinator)."""
    model: str | None = None
    """Model id to request; None: the first id that GET /v1/models lists."""
    api_key: str = "none"
    concurrency: int = Field(4, ge=1, le=1024)
    """Streams in flight at once: each worker sends its next request when its last one finished."""
    duration_s: float = Field(30.0, gt=0)
    """Workers stop starting new requests after this long (requests in flight are finished)."""
    num_requests: int | None = Field(None, ge=1)
    """A fixed number of measured requests instead of a duration."""
    warmup_requests: int = Field(1, ge=0)
    """Sent (one at a time) before the clock starts, and not counted."""
    max_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    """Chat prompts, used in turn."""
    distinct_prompts: bool = True
    """Each measured request's prompt ends with this run's random id and the request's number (" (run 3fa2c1,
    request 17)"), so no two requests are identical, not even those of two runs against one node. An OpenHydra node
    serves identical greedy requests in flight with one generation (coalescing): with the bare prompts, a run at
    concurrency > 1 would count tokens the node computed once as throughput of several streams. false: the prompts
    exactly as given (the summary's ``coalesced`` says how many requests the node served so)."""
    request_timeout_s: float = Field(120.0, gt=0)
    out_dir: str | None = None
    """report.json, report.md and report.png go here; None prints the table and JSON only."""
    label: str | None = None
    """A name for this run in the report (e.g. the config being compared)."""
    progress: bool = True

    @model_validator(mode="after")
    def _url_is_http(self) -> LoadgenConfig:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self
