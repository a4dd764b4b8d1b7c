"""Statement e-mails of a finalized period, through an outbox (billing.models.StatementEmail).

One row per e-mail owed: each member's statement of their invoice and one summary for the
team's admins. The database decides who sends what: rows are created once (unique per
invoice, one summary per period; a concurrent run's insert is ignored), and a row is sent
only by the worker whose conditional UPDATE moved it pending → sending. The mail goes out
outside any transaction, then the row moves to sent (or back to pending when the server
refused it). A row still in `sending` when a later run looks (its worker died mid-send: the
mail may have left) becomes needs_attention and waits for an admin's resend
(`statement_resend`, `resend_statement`, the admin's action), which keeps its Message-ID.

Texts are translatable (templates/billing/email/); amounts, prices and percentages are
formatted by Babel for the language in force (settings.LANGUAGE_CODE), display only.
"""
import csv
import io
import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

from django.conf import settings
from django.core import mail
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives, make_msgid
from django.db import transaction
from django.db.models import F
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone, translation

from billing.focus import focus_csv_write
from billing.models import BillingPeriod, Invoice, InvoiceLine, StatementEmail
from billing.money import current_locale, format_amount, format_percent, format_price
from billing.selectors import (
    invoice_detail, period_invoices_for_summary, share_of, statement_usage_by_day, team_admin_addresses,
)
from billing.services.audit import STATEMENT_RESENT, billing_audit

logger = logging.getLogger(__name__)

STATEMENTS_PERIOD_NOT_FINALIZED = ("{team}'s {month} is not finalized: statements go out once its invoices are "
                                   "issued (finalize_period {team} --month {month}).")
STATEMENT_NOT_FINALIZED = "Invoice {invoice} is a draft: only issued invoices have statements."
STATEMENT_NOT_CREATED = ("The statement of {invoice} has not been queued yet: the finalize task sends "
                         "the period's statements (billing.services.period_statements_send).")
STATEMENT_PENDING = "The statement of {invoice} is pending: the next run sends it (nothing to resend yet)."
STATEMENT_SENDING = "The statement of {invoice} is being sent right now: look again in a minute."
STATEMENT_CHANGED = "The statement of {invoice} changed meanwhile ({status}): nothing was sent."
STATEMENT_SEND_FAILED = "Sending the statement of {invoice} failed ({error}); it is marked needs_attention."
STATEMENT_NO_RECIPIENT = "no e-mail address: {who}"
INTERRUPTED = "interrupted while sending (attempt {attempts}): the mail may have left; resend it deliberately"
ERROR_MAX = 1000
# Django's SMTP backend waits forever without EMAIL_TIMEOUT; a hung server must fail the send
# (the row goes back to pending), not hold it in `sending` until the worker is killed.
SEND_TIMEOUT_SECONDS = 60


# --- formatting (display only) ----------------------------------------------------------

def public_url(path: str) -> str:
    return settings.QWENHUB_PUBLIC_URL.rstrip("/") + path


def statement_invoice_url(*, invoice: Invoice) -> str:
    """The member's own page of the invoice (the member dashboard's statement; reversed by name only)."""
    return public_url(reverse("member:invoice", args=[invoice.pk]))


def statement_period_url(*, period: BillingPeriod) -> str:
    return public_url(reverse("admin:billing_billingperiod_change", args=[period.pk]))


# --- building the messages --------------------------------------------------------------

@dataclass(frozen=True)
class LineView:
    kind: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    amount: str
    public_price_amount: str
    reason: str


def usage_csv(*, invoice: Invoice) -> str:
    """The member's month by day and model (tokens counted as the invoice counts them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["date", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens"])
    for row in statement_usage_by_day(invoice=invoice):
        prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
        writer.writerow([row["day"].isoformat(), row["model"], row["requests"], prompt, completion,
                         prompt + completion])
    return out.getvalue()


def _member_context(invoice: Invoice, locale: str) -> dict:
    detail = invoice_detail(invoice=invoice)
    invoice, period = detail.invoice, detail.invoice.period
    cur = period.currency
    lines = [LineView(line.kind, line.model, line.requests, line.prompt_tokens, line.completion_tokens,
                      format_amount(line.amount, cur, locale), format_amount(line.public_price_amount, cur, locale), line.reason)
             for line in detail.lines]
    prices = (period.policy or {}).get("public_prices") or {}
    return {
        "team": period.team, "period": period, "invoice": invoice, "member": invoice.member,
        "username": invoice.member.user.get_username(), "lines": lines,
        "usage_lines": [v for v in lines if v.kind == InvoiceLine.Kind.USAGE],
        "other_lines": [v for v in lines if v.kind != InvoiceLine.Kind.USAGE],
        "amount": format_amount(invoice.amount, cur, locale), "allocated": format_amount(invoice.allocated, cur, locale),
        "adjusted": invoice.amount != invoice.allocated, "share": format_percent(invoice.share, locale),
        "cost": format_amount(period.cost, cur, locale), "explanation": period.explanation_text, "policy": period.policy_name,
        "tokens": detail.tokens, "effective_price": format_price(detail.effective_price, cur, locale),
        "has_public_prices": bool(prices) and detail.public_price_amount is not None,
        "public_price_amount": format_amount(detail.public_price_amount, cur, locale),
        "public_prices": [{"model": m, "prompt": format_price(Decimal(str(p.get("prompt", 0))), cur, locale),
                           "completion": format_price(Decimal(str(p.get("completion", 0))), cur, locale)}
                          for m, p in sorted(prices.items())],
        "url": statement_invoice_url(invoice=invoice),
    }


def _summary_context(period: BillingPeriod, locale: str) -> dict:
    cur = period.currency
    invoices = period_invoices_for_summary(period=period)
    rows = [{"username": i.member.user.get_username(), "number": i.number or "",
             "allocated": format_amount(i.allocated, cur, locale), "amount": format_amount(i.amount, cur, locale),
             "share": format_percent(i.share, locale)} for i in invoices]
    difference = None if period.actual_cost is None else period.actual_cost - period.planned_cost
    return {
        "team": period.team, "period": period, "rows": rows, "explanation": period.explanation_text,
        "policy": period.policy_name, "fell_back": period.fell_back,
        "cost": format_amount(period.cost, cur, locale), "planned_cost": format_amount(period.planned_cost, cur, locale),
        "actual_cost": format_amount(period.actual_cost, cur, locale), "difference": format_amount(difference, cur, locale),
        "allocated": format_amount(period.allocated, cur, locale), "idle": format_amount(period.idle, cur, locale),
        "idle_share": format_percent(share_of(period.idle, period.cost), locale) if period.cost else format_percent(0, locale),
        "unallocated": format_amount(period.unallocated, cur, locale), "has_unallocated": bool(period.unallocated),
        "url": statement_period_url(period=period),
    }


def statement_message(*, email: StatementEmail, to: list[str], connection=None) -> EmailMultiAlternatives:
    """The e-mail of an outbox row (HTML and plain text, its CSV attached, its Message-ID), in the site's language."""
    with translation.override(settings.LANGUAGE_CODE):
        locale = current_locale()
        if email.kind == StatementEmail.Kind.MEMBER:
            invoice = email.invoice
            context = _member_context(invoice, locale)
            template = "billing/email/statement"
            attachment = (f"usage-{invoice.number}.csv", usage_csv(invoice=invoice))
        else:
            period = email.period
            context = _summary_context(period, locale)
            template = "billing/email/summary"
            out = io.StringIO()
            focus_csv_write(period=period, out=out)
            attachment = (f"focus-{period.team.slug}-{period.start:%Y-%m}.csv", out.getvalue())
        subject = " ".join(render_to_string(f"{template}_subject.txt", context).split())
        text = render_to_string(f"{template}.txt", context)
        html = render_to_string(f"{template}.html", context)
    message = EmailMultiAlternatives(subject=subject, body=text, from_email=settings.DEFAULT_FROM_EMAIL, to=to,
                                     headers={"Message-ID": email.message_id}, connection=connection)
    message.attach_alternative(html, "text/html")
    message.attach(attachment[0], attachment[1], "text/csv")
    return message


def _recipients(email: StatementEmail) -> tuple[list[str], str]:
    if email.kind == StatementEmail.Kind.MEMBER:
        user = email.invoice.member.user
        return ([user.email] if user.email else []), f"member {user.get_username()}"
    return team_admin_addresses(team=email.period.team), f"no active admin of {email.period.team.slug}"


# --- the outbox -------------------------------------------------------------------------

def _msgid() -> str:
    return make_msgid(domain=urlsplit(settings.QWENHUB_PUBLIC_URL).hostname or "qwenhub.localhost")


def _outbox_open(period: BillingPeriod) -> None:
    """Create the period's outbox rows that do not exist yet (a concurrent run's rows win)."""
    with transaction.atomic(durable=True):  # durable: never inside a caller's transaction (see _send)
        have = set(StatementEmail.objects.filter(period=period, kind=StatementEmail.Kind.MEMBER)
                   .values_list("invoice_id", flat=True))
        rows = [StatementEmail(kind=StatementEmail.Kind.MEMBER, team_id=period.team_id, period=period,
                               invoice_id=pk, message_id=_msgid())
                for pk in period.invoices.order_by("sequence").values_list("pk", flat=True) if pk not in have]
        if not StatementEmail.objects.filter(period=period, kind=StatementEmail.Kind.SUMMARY).exists():
            rows.append(StatementEmail(kind=StatementEmail.Kind.SUMMARY, team_id=period.team_id, period=period,
                                       message_id=_msgid()))
        StatementEmail.objects.bulk_create(rows, ignore_conflicts=True)


def _connection():
    return mail.get_connection(timeout=getattr(settings, "EMAIL_TIMEOUT", None) or SEND_TIMEOUT_SECONDS)


def _close(connection) -> None:
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail too
        pass


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:ERROR_MAX]


def _send(email: StatementEmail, *, claimed_from: str, on_failure: str, connection) -> str | None:
    """Claim the row (claimed_from → sending), send it, record the outcome; None if sent, else why not.

    The send happens outside any transaction: a rollback after the mail left would put the
    row back to pending and send it twice.
    """
    to, who = _recipients(email)
    if not to:
        error = STATEMENT_NO_RECIPIENT.format(who=who)
        StatementEmail.objects.filter(pk=email.pk, status=claimed_from).update(last_error=error,
                                                                              updated_at=timezone.now())
        return error
    message = statement_message(email=email, to=to, connection=connection)  # a build error claims nothing
    token = uuid.uuid4()
    claimed = StatementEmail.objects.filter(pk=email.pk, status=claimed_from).update(
        status=StatementEmail.Status.SENDING, claim=token, attempts=F("attempts") + 1, recipients=to,
        sending_since=timezone.now(), updated_at=timezone.now())
    if claimed != 1:
        return "taken"  # another worker claimed it first
    mine = StatementEmail.objects.filter(pk=email.pk, claim=token,
                                         status__in=[StatementEmail.Status.SENDING, StatementEmail.Status.NEEDS_ATTENTION])
    try:
        sent = connection.send_messages([message])
        if not sent:
            raise RuntimeError("the e-mail backend sent nothing")
    except Exception as exc:
        _close(connection)  # the next message opens a fresh connection
        error = _error(exc)
        mine.update(status=on_failure, last_error=error, updated_at=timezone.now())
        logger.warning("statement e-mail %s not sent: %s", email.pk, error)
        return error
    # The claim is still ours even if a concurrent run saw us in `sending` and flagged the row.
    mine.update(status=StatementEmail.Status.SENT, sent_at=timezone.now(), last_error="", updated_at=timezone.now())
    return None


def _flag_interrupted(period: BillingPeriod) -> int:
    """Rows a worker left in `sending` → needs_attention (never re-sent without an admin)."""
    flagged = 0
    for pk, attempts in (StatementEmail.objects.filter(period=period, status=StatementEmail.Status.SENDING)
                         .values_list("pk", "attempts")):
        flagged += StatementEmail.objects.filter(pk=pk, status=StatementEmail.Status.SENDING).update(
            status=StatementEmail.Status.NEEDS_ATTENTION, last_error=INTERRUPTED.format(attempts=attempts),
            updated_at=timezone.now())
    if flagged:
        logger.warning("period %s: %d statement e-mail(s) were interrupted while sending and need an admin's resend",
                       period.pk, flagged)
    return flagged


def period_statements_send(*, period: BillingPeriod) -> int:
    """E-mail a finalized period's statements (each member's, then the admins' summary); return how many were sent.

    Called by the daily finalize task after finalizing, and safe to call again at any time
    (a retry after an SMTP failure sends what is still pending): a sent statement is never
    sent again, a statement whose sending was interrupted is flagged needs_attention, not
    sent. Two runs at once send each statement once. Call it outside a transaction (inside
    one it raises RuntimeError: a rollback after a mail left would send that mail again).
    """
    period = BillingPeriod.objects.select_related("team").get(pk=period.pk)
    if period.status != BillingPeriod.Status.FINALIZED:
        raise ValidationError(STATEMENTS_PERIOD_NOT_FINALIZED.format(team=period.team.slug,
                                                                    month=f"{period.start:%Y-%m}"))
    _outbox_open(period)
    _flag_interrupted(period)
    pending = list(StatementEmail.objects.filter(period=period, status=StatementEmail.Status.PENDING)
                   .select_related("period__team", "invoice__member__user")
                   .order_by("kind", "invoice__sequence", "pk"))  # "member" sorts before "summary"
    sent = 0
    connection = _connection()
    try:
        for email in pending:
            if _send(email, claimed_from=StatementEmail.Status.PENDING, on_failure=StatementEmail.Status.PENDING,
                     connection=connection) is None:
                sent += 1
    finally:
        _close(connection)
    return sent


def statement_email_resend(*, email: StatementEmail, actor=None, reason: str = "") -> StatementEmail:
    """An admin's deliberate resend of a sent or needs_attention e-mail (same Message-ID); audited.

    Refuses a pending row (the next run sends it) and one being sent. A failure leaves the
    row needs_attention with the error, and says so.
    """
    email = StatementEmail.objects.select_related("period__team", "invoice__member__user").get(pk=email.pk)
    label = email.invoice.number if email.invoice_id else f"{email.period.team.slug} {email.period.start:%Y-%m}"
    if email.status == StatementEmail.Status.PENDING:
        raise ValidationError(STATEMENT_PENDING.format(invoice=label))
    if email.status == StatementEmail.Status.SENDING:
        raise ValidationError(STATEMENT_SENDING.format(invoice=label))
    previous = email.status
    connection = _connection()
    try:
        error = _send(email, claimed_from=previous, on_failure=StatementEmail.Status.NEEDS_ATTENTION,
                      connection=connection)
    finally:
        _close(connection)
    email.refresh_from_db()
    if error == "taken":
        raise ValidationError(STATEMENT_CHANGED.format(invoice=label, status=email.status))
    billing_audit(
        action=STATEMENT_RESENT, team=email.period.team,
        member_id=email.invoice.member_id if email.invoice_id else None, actor=actor,
        subject_id=email.invoice_id or email.period_id, reason=reason or "",
        data={ "statement_email": email.pk, "kind": email.kind, "invoice": label,
              "message_id": email.message_id, "previous_status": previous, "attempt": email.attempts,
              "sent": error is None, **({"error": error} if error else {})})
    if error is not None:
        raise ValidationError(STATEMENT_SEND_FAILED.format(invoice=label, error=error))
    return email


def statement_resend(*, invoice: Invoice, actor=None, reason: str = "") -> StatementEmail:
    """Resend a member's statement of an issued invoice (see statement_email_resend)."""
    invoice = Invoice.objects.select_related("period__team").get(pk=invoice.pk)
    label = invoice.number or str(invoice)
    if invoice.issued_at is None or invoice.period.status != BillingPeriod.Status.FINALIZED:
        raise ValidationError(STATEMENT_NOT_FINALIZED.format(invoice=label))
    email = StatementEmail.objects.filter(invoice=invoice, kind=StatementEmail.Kind.MEMBER).first()
    if email is None:
        raise ValidationError(STATEMENT_NOT_CREATED.format(invoice=label))
    return statement_email_resend(email=email, actor=actor, reason=reason)
