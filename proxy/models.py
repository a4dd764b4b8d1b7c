"""Where models are served: upstream vLLM servers and the routes to them."""
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from qwenhub.models import TimestampedModel

UPSTREAM_URL_INVALID = "Enter the upstream's base URL as an OpenAI client would use it, e.g. http://gpu-host:8000/v1."


def validate_upstream_url(value: str) -> None:
    """Accept http(s) URLs with any host name, including single-label ones (gpu-host, a compose service)."""
    # Django's URLValidator demands a dotted domain, which refuses http://vllm:8000/v1.
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise ValidationError(UPSTREAM_URL_INVALID) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or any(c.isspace() for c in value)):
        raise ValidationError(UPSTREAM_URL_INVALID)


class Upstream(TimestampedModel):
    """One vLLM server (or replica), addressed as an OpenAI client would."""

    name = models.SlugField(max_length=64, unique=True)
    # e.g. http://gpu-host:8000/v1
    base_url = models.CharField(max_length=500, validators=[validate_upstream_url])
    # vLLM's --api-key; stays between the gateway and vLLM, never sent to members.
    api_key = models.CharField(max_length=500, blank=True)
    enabled = models.BooleanField(default=True)
    # vLLM's --max-num-seqs: how many sequences it runs at once.
    max_concurrency = models.PositiveIntegerField(default=256, validators=[MinValueValidator(1)])

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(max_concurrency__gte=1), name="upstream_concurrency_pos")]

    def __str__(self) -> str:
        return self.name


class PublicModel(TimestampedModel):
    """A model name members use in requests, e.g. "qwen2.5-7b-instruct"."""

    name = models.CharField(max_length=200, unique=True)
    # Completion-token bound reserved against quota when a request names no max_tokens.
    default_max_tokens = models.PositiveIntegerField(default=4096)
    # Context window; bounds what one request can cost.
    max_model_len = models.PositiveIntegerField(default=32768)

    def __str__(self) -> str:
        return self.name


class ModelAlias(models.Model):
    """Another name for a PublicModel (e.g. "gpt-4o-mini" → "qwen2.5-7b-instruct")."""

    alias = models.CharField(max_length=200, unique=True)
    model = models.ForeignKey(PublicModel, on_delete=models.CASCADE, related_name="aliases")

    class Meta:
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return self.alias


class ModelRoute(TimestampedModel):
    """A PublicModel served by an Upstream under the upstream's own model name."""

    model = models.ForeignKey(PublicModel, on_delete=models.CASCADE, related_name="routes")
    upstream = models.ForeignKey(Upstream, on_delete=models.CASCADE, related_name="routes")
    # The name vLLM knows (its --served-model-name).
    served_name = models.CharField(max_length=200)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "upstream"], name="uniq_route_model_upstream")]

    def __str__(self) -> str:
        return f"{self.model} → {self.upstream}:{self.served_name}"


class UpstreamHealthSample(models.Model):
    """What one scrape of an upstream's Prometheus /metrics said (proxy.health; kept 24 h).

    Gauges are as read; rates are the change since the upstream's previous sample (None on
    the first sample, after a restart of the server, or when the scrape failed). A failed
    scrape is a row too: `ok` False and `error` says why, every figure None.
    """

    upstream = models.ForeignKey(Upstream, on_delete=models.CASCADE, related_name="health_samples")
    taken_at = models.DateTimeField()
    ok = models.BooleanField(default=False)
    error = models.CharField(max_length=300, blank=True)
    running = models.PositiveIntegerField(null=True, blank=True)
    waiting = models.PositiveIntegerField(null=True, blank=True)
    kv_cache_usage = models.FloatField(null=True, blank=True)  # fraction 0–1
    # The raw counters, so the next sample can take the deltas.
    generation_tokens_total = models.FloatField(null=True, blank=True)
    ttft_sum = models.FloatField(null=True, blank=True)
    ttft_count = models.FloatField(null=True, blank=True)
    generation_tokens_per_second = models.FloatField(null=True, blank=True)
    ttft_mean_seconds = models.FloatField(null=True, blank=True)  # requests first answered since the last sample

    class Meta:
        indexes = [models.Index(fields=["upstream", "-taken_at"], name="health_upstream_taken")]

    def __str__(self) -> str:
        return f"{self.upstream_id} @ {self.taken_at:%Y-%m-%d %H:%M:%S}"
