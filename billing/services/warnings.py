"""Soft-quota warnings: one e-mail per member, period, quota and level (80 %, then 100 %).

A quota counts what the open period's counter holds, used + reserved, against its limit
(top-ups included). Unlimited quotas (no limit) and a limit of 0 (nothing can be used)
are never warned about, nor are members without an e-mail address or suspended ones.

Exactly once, whatever runs it twice or at once: a QuotaWarning row (unique member,
period, kind, level) is inserted and committed BEFORE the e-mail goes out, and the insert
decides; an IntegrityError means another run warned already. A member who jumps past both
levels between two runs gets the 100 % e-mail only (a lower level is never sent after a
higher one). If sending fails, the row is deleted again so the next run retries; a worker
killed between the insert and the send loses that one warning rather than sending it twice.
"""
import logging
import smtplib
from dataclasses import dataclass

from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from billing.models import QuotaWarning
from tenants.models import QuotaCounter, Team
from tenants.periods import period_reset_at, period_start_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Crossing:
    counter: QuotaCounter
    kind: str
    level: int
    used: int
    limit: int


def _open_counters(now):
    """The counters of every team's open period (each team's month in its own time zone)."""
    months = Q(pk__in=[])
    for tz in Team.objects.order_by().values_list("timezone", flat=True).distinct():
        months |= Q(member__team__timezone=tz, period_start=period_start_for(tz, now))
    return QuotaCounter.objects.filter(months)


def _crossings(now) -> list[_Crossing]:
    """Every (counter, kind) at or above 80 % of a non-zero limit, with the highest level reached."""
    found = []
    for kind, limit, used, reserved in (("requests", "request_limit", "requests_used", "requests_reserved"),
                                        ("tokens", "token_limit", "tokens_used", "tokens_reserved")):
        rows = (_open_counters(now)
                .filter(**{f"{limit}__gt": 0}, member__is_active=True)
                .exclude(member__user__email="")
                # (used + reserved) / limit >= 80 %, in integers: (used + reserved) × 5 >= limit × 4
                .alias(spent_x5=(F(used) + F(reserved)) * 5, limit_x4=F(limit) * 4)
                .filter(spent_x5__gte=F("limit_x4"))
                .select_related("member__user", "member__team").order_by("pk"))
        for counter in rows:
            total = getattr(counter, used) + getattr(counter, reserved)
            cap = getattr(counter, limit)
            found.append(_Crossing(counter, kind, 100 if total >= cap else 80, total, cap))
    return found


def _message(crossing: _Crossing) -> tuple[str, str]:
    member = crossing.counter.member
    team = member.team
    month = f"{crossing.counter.period_start:%Y-%m}"
    resets = period_reset_at(team.timezone, crossing.counter.period_start)
    quota = _("request quota") if crossing.kind == QuotaWarning.Kind.REQUESTS else _("token quota")
    values = {"level": crossing.level, "quota": quota, "month": month, "team": team.name,
              "used": crossing.used, "limit": crossing.limit, "left": max(crossing.limit - crossing.used, 0),
              "resets": f"{resets:%Y-%m-%d %H:%M} ({team.timezone})"}
    if crossing.level >= 100:
        subject = _("QwenHub: you have used all of your %(quota)s for %(month)s") % values
        intro = _("You have used all of your %(quota)s in %(team)s for %(month)s: new requests are "
                  "refused until the quota resets or an admin tops it up.") % values
    else:
        subject = _("QwenHub: you have used %(level)s%% of your %(quota)s for %(month)s") % values
        intro = _("You have used %(level)s%% of your %(quota)s in %(team)s for %(month)s.") % values
    body = "\n\n".join([
        _("Hello %(name)s,") % {"name": member.user.get_full_name() or member.user.get_username()},
        intro,
        _("Used (including requests in flight): %(used)s of %(limit)s; left: %(left)s.") % values,
        _("The quota resets at %(resets)s.") % values,
        _("This is the only e-mail about this level of this quota this month."),
    ]) + "\n"
    return subject, body


def _claim(crossing: _Crossing) -> QuotaWarning | None:
    """Insert the warning row (committed); None if this level or a higher one was already warned."""
    counter = crossing.counter
    if QuotaWarning.objects.filter(member_id=counter.member_id, period_start=counter.period_start,
                                   kind=crossing.kind, level__gte=crossing.level).exists():
        return None
    try:
        with transaction.atomic():
            return QuotaWarning.objects.create(
                member_id=counter.member_id, period_start=counter.period_start, kind=crossing.kind,
                level=crossing.level, used=crossing.used, limit=crossing.limit, email=counter.member.user.email)
    except IntegrityError:
        return None  # another run inserted it first: it sends


def quota_warnings_send(*, now=None) -> list[QuotaWarning]:
    """E-mail every member who reached 80 % or 100 % of a quota in the open period, once per level.

    Safe to run as often as wanted (the scheduler runs it every 15 minutes): a rerun sends
    only to members who crossed a level since. Returns the warnings sent by this run.
    """
    now = now or timezone.now()
    sent = []
    for crossing in _crossings(now):
        warning = _claim(crossing)
        if warning is None:
            continue
        subject, body = _message(crossing)
        try:
            send_mail(subject, body, None, [warning.email])
        except (smtplib.SMTPException, OSError):
            # Not accepted by the mail server: forget the claim so the next run tries again.
            logger.exception("quota warning %s for member %s not sent", warning.pk, warning.member_id)
            QuotaWarning.objects.filter(pk=warning.pk, sent_at__isnull=True).delete()
            continue
        QuotaWarning.objects.filter(pk=warning.pk).update(sent_at=timezone.now())
        sent.append(warning)
    return sent
