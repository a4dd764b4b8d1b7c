"""factory_boy factories for tenants (and the upstream/billing rows tests need around them)."""
import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.models import UsageRecord
from proxy.models import ModelRoute, PublicModel, Upstream
from tenants.keys import api_key_display_prefix, api_key_generate, api_key_hash
from tenants.models import ApiKey, Member, QuotaCounter, Team
from tenants.periods import period_start_for


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ["username"]
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = factory.django.Password("pw-for-tests")


class TeamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Team

    slug = factory.Sequence(lambda n: f"team-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())
    timezone = "Asia/Shanghai"
    currency = "CNY"
    monthly_cost = "3000.00"


class MemberFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Member

    user = factory.SubFactory(UserFactory)
    team = factory.SubFactory(TeamFactory)
    role = Member.Role.MEMBER
    request_quota = 1000
    token_quota = 1_000_000


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """A stored key; the raw key is kept on the instance as `.raw` for tests (never in the database)."""

    class Meta:
        model = ApiKey

    raw = factory.LazyFunction(api_key_generate)
    member = factory.SubFactory(MemberFactory)
    label = "test"
    prefix = factory.LazyAttribute(lambda o: api_key_display_prefix(o.raw))
    key_hash = factory.LazyAttribute(lambda o: api_key_hash(o.raw))

    @classmethod
    def _create(cls, model_class, *args, raw, **kwargs):
        obj = super()._create(model_class, *args, **kwargs)
        obj.raw = raw
        return obj

    @classmethod
    def _build(cls, model_class, *args, raw, **kwargs):
        obj = super()._build(model_class, *args, **kwargs)
        obj.raw = raw
        return obj


class UpstreamFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Upstream

    name = factory.Sequence(lambda n: f"gpu{n}")
    base_url = factory.LazyAttribute(lambda o: f"http://{o.name}:8000/v1")
    api_key = "vllm-secret-for-tests"
    max_concurrency = 64


class PublicModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PublicModel
        django_get_or_create = ["name"]

    name = "qwen2.5-7b-instruct"


class ModelRouteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ModelRoute

    model = factory.SubFactory(PublicModelFactory)
    upstream = factory.SubFactory(UpstreamFactory)
    served_name = "Qwen2.5-7B-Instruct"


class QuotaCounterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = QuotaCounter

    member = factory.SubFactory(MemberFactory)
    period_start = factory.LazyAttribute(lambda o: period_start_for(o.member.team.timezone))
    request_limit = factory.LazyAttribute(lambda o: o.member.request_quota)
    token_limit = factory.LazyAttribute(lambda o: o.member.token_quota)


class UsageRecordFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = UsageRecord

    request_id = factory.Sequence(lambda n: f"req-{n:08d}")
    member = factory.SubFactory(MemberFactory)
    team = factory.LazyAttribute(lambda o: o.member.team)
    period_start = factory.LazyAttribute(lambda o: period_start_for(o.member.team.timezone))
    endpoint = "chat.completions"
    model = "qwen2.5-7b-instruct"
    upstream = "gpu0"
    prompt_tokens = 100
    completion_tokens = 50
    total_tokens = 150
    status = UsageRecord.Status.OK
    http_status = 200
    started_at = factory.LazyFunction(timezone.now)
    duration_ms = 123.0
