"""Invitations: a team admin adds a person by e-mail, and the person sets their own password.

The invited user is created with an unusable password; the e-mail (sent once the transaction
commits) carries a set-password link made with INVITE_TOKENS. Like Django's password-reset
tokens it is tied to the user's password hash and last login, so it stops working as soon as
the password is set (single use), and after settings.PASSWORD_RESET_TIMEOUT (expiring).
"""
import logging
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.tokens import PasswordResetTokenGenerator
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives
from django.core.validators import validate_email
from django.db import transaction
from django.utils.translation import gettext_lazy as _
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from tenants.models import AuditEvent, Member, Team
from tenants.services.audit import audit_record
from tenants.services.teams import USER_EXISTS, member_add

logger = logging.getLogger(__name__)
User = get_user_model()

EMAIL_EXISTS = _("A user with the e-mail address {email!r} already exists.")


class InviteTokenGenerator(PasswordResetTokenGenerator):
    """Password-reset tokens under their own salt: an invite link is not a reset link, nor the reverse."""

    key_salt = "tenants.services.invites.InviteTokenGenerator"


INVITE_TOKENS = InviteTokenGenerator()


def invite_link(*, user) -> str:
    """The set-password link, on QWENHUB_PUBLIC_URL (never on the Host header of whoever asked)."""
    path = reverse("invite_accept", kwargs={"uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
                                            "token": INVITE_TOKENS.make_token(user)})
    return settings.QWENHUB_PUBLIC_URL.rstrip("/") + path


def invite_email_send(*, member: Member, inviter_name: str = "") -> None:
    context = {
        "member": member, "team": member.team, "username": member.user.get_username(),
        "inviter": inviter_name, "link": invite_link(user=member.user),
        "public_url": settings.QWENHUB_PUBLIC_URL.rstrip("/"),
        "valid_days": max(1, settings.PASSWORD_RESET_TIMEOUT // 86400),
    }
    subject = " ".join(render_to_string("tenants/email/invite_subject.txt", context).split())
    message = EmailMultiAlternatives(subject=subject, body=render_to_string("tenants/email/invite.txt", context),
                                     from_email=settings.DEFAULT_FROM_EMAIL, to=[member.user.email])
    message.attach_alternative(render_to_string("tenants/email/invite.html", context), "text/html")
    message.send()
    logger.info("invitation sent to member %s of team %s", member.pk, member.team.slug)


@transaction.atomic(durable=True)
def member_invite(*, team: Team, email: str, username: str, role: str = Member.Role.MEMBER,
                  request_quota: int | None = None, token_quota: int | None = None, actor,
                  reason: str = "") -> Member:
    """Create the user (no usable password) and their membership, and e-mail them a set-password link.

    Records MEMBER_ADDED (member_add's) and MEMBER_INVITED. The e-mail leaves after commit;
    a failure to send it is logged, not raised (the member exists; an admin may resend the
    invitation with member_invite_resend).
    """
    email = User.objects.normalize_email(email.strip())
    validate_email(email)
    if User.objects.filter(username=username).exists():
        raise ValidationError({"username": USER_EXISTS.format(username=username)})
    if User.objects.filter(email__iexact=email).exists():
        raise ValidationError({"email": EMAIL_EXISTS.format(email=email)})
    member = member_add(team=team, username=username, email=email, role=role, request_quota=request_quota,
                        token_quota=token_quota, password=None, actor=actor, reason=reason)
    audit_record(kind=AuditEvent.Kind.MEMBER_INVITED, team=team, member=member, actor=actor, subject_id=member.pk,
                 reason=reason, data={"email": email})
    _email_after_commit(member=member, actor=actor)
    return member


def _email_after_commit(*, member: Member, actor) -> None:
    inviter = (actor.get_full_name() or actor.get_username()) if actor is not None else ""
    transaction.on_commit(lambda: invite_email_send(member=member, inviter_name=inviter), robust=True)


NOT_PENDING = _("{username} has already set a password: a password reset, not an invitation, is what they need.")
INVITE_NO_EMAIL = _("{username} has no e-mail address to send an invitation to.")
INVITE_SUSPENDED = _("{username} is suspended: reactivate them before inviting them again.")


def invite_pending(*, member: Member) -> bool:
    """True while the invited person has not set a password (a password reset cannot reach them)."""
    return not member.user.has_usable_password()


@transaction.atomic(durable=True)
def member_invite_resend(*, member: Member, actor, reason: str = "") -> None:
    """E-mail a fresh set-password link to an invited member who has not set a password yet.

    For a link that expired or an e-mail that was lost. Earlier links keep working until they
    expire or the password is set. Records MEMBER_INVITED with resent=True.
    """
    username = member.user.get_username()
    if not invite_pending(member=member):
        raise ValidationError(NOT_PENDING.format(username=username))
    if not member.user.email:
        raise ValidationError(INVITE_NO_EMAIL.format(username=username))
    if not member.is_active:
        raise ValidationError(INVITE_SUSPENDED.format(username=username))
    audit_record(kind=AuditEvent.Kind.MEMBER_INVITED, team=member.team, member=member, actor=actor,
                 subject_id=member.pk, reason=reason, data={"email": member.user.email, "resent": True})
    _email_after_commit(member=member, actor=actor)


def invites_resend_for_email(*, email: str) -> int:
    """The password-reset form's part for invitees: a fresh invitation to whoever was invited under email.

    Django's reset skips users without a usable password, so an invited person whose link expired
    would hear nothing. Returns how many were sent (the page says the same either way).
    """
    members = (Member.objects.filter(user__email__iexact=email.strip(), user__is_active=True, is_active=True)
               .select_related("user", "team").order_by("user_id", "pk"))
    sent = set()
    for member in members:
        if member.user_id not in sent and invite_pending(member=member):
            invite_email_send(member=member)
            audit_record(kind=AuditEvent.Kind.MEMBER_INVITED, team=member.team, member=member, actor=None,
                         subject_id=member.pk, reason="asked for a password reset",
                         data={"email": member.user.email, "resent": True})
            sent.add(member.user_id)
    return len(sent)
