"""factory_boy factories for billing tests (tenants' factories make the teams, members and usage rows)."""
import zoneinfo
from datetime import date, datetime

import factory

from billing.models import BillingPolicy
from tenants.models import Member
from tenants.tests.factories import MemberFactory, UsageRecordFactory

UTC = zoneinfo.ZoneInfo("UTC")
LONG_AGO = datetime(2025, 1, 1, tzinfo=UTC)


class MemberJoinedFactory(MemberFactory):
    """A member who joined at `joined_at` (default: long before the months the tests bill)."""

    class Meta:
        skip_postgeneration_save = True

    @factory.post_generation
    def joined_at(obj, create, extracted, **kwargs):
        when = extracted or LONG_AGO
        if create:
            Member.objects.filter(pk=obj.pk).update(created_at=when)
        obj.created_at = when


class BillingPolicyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = BillingPolicy
        django_get_or_create = ["team"]


def usage(member, start: date, *, prompt=100, completion=50, model="qwen2.5-7b-instruct", status="ok",
          started_at=None, **kwargs):
    """One usage row of `member` admitted in the month beginning `start`."""
    when = started_at or datetime(start.year, start.month, 15, 12, tzinfo=zoneinfo.ZoneInfo(member.team.timezone))
    return UsageRecordFactory(member=member, team=member.team, period_start=start, prompt_tokens=prompt,
                              completion_tokens=completion, total_tokens=prompt + completion, model=model,
                              status=status, started_at=when, **kwargs)
