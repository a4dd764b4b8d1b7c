"""Sign-in (rate-limited), password reset on the public URL, and invitations."""
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.utils.translation import gettext as _

from dashboards.access import team_admin_required
from dashboards.accounts import throttle
from dashboards.accounts.forms import InviteForm
from tenants.services import INVITE_TOKENS, invites_resend_for_email, member_invite

LIMITED = 429


class LoginView(auth_views.LoginView):
    """Django's sign-in, refused with 429 once the account or the address has failed too often.

    (Django's LoginView already hides the POSTed password from error reports.)
    """

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        if throttle.login_limited(request, username):
            # Checked before the password: a limited attempt learns nothing about it. The form
            # is unbound, so rendering it does not authenticate either.
            form = self.get_form_class()(request, initial={"username": username})
            return self.render_to_response(self.get_context_data(form=form, limited=True), status=LIMITED)
        return super().post(request, *args, **kwargs)

    def form_valid(self, form):
        throttle.login_succeeded(form.get_user().get_username())
        return super().form_valid(form)

    def form_invalid(self, form):
        if self.request.POST.get("username", "").strip() and self.request.POST.get("password"):
            throttle.login_failed(self.request, self.request.POST["username"])
        return super().form_invalid(form)


class PasswordResetView(auth_views.PasswordResetView):
    """Reset links are built on QWENHUB_PUBLIC_URL, never on the request's Host header.

    Someone invited who never set a password gets a fresh invitation instead (Django's reset
    sends nothing to a user without a usable password); the page reads the same either way.
    """

    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"

    def form_valid(self, form):
        public = urlsplit(settings.QWENHUB_PUBLIC_URL)
        self.domain_override = public.netloc
        self.extra_email_context = {"public_url": settings.QWENHUB_PUBLIC_URL.rstrip("/"),
                                    "valid_days": max(1, settings.PASSWORD_RESET_TIMEOUT // 86400)}
        self.use_https = public.scheme == "https"
        response = super().form_valid(form)
        invites_resend_for_email(email=form.cleaned_data["email"])
        return response


class InviteAcceptView(auth_views.PasswordResetConfirmView):
    """The invited person chooses a password through the e-mailed link, then is signed in."""

    template_name = "dashboards/accounts/invite_accept.html"
    token_generator = INVITE_TOKENS
    post_reset_login = True
    post_reset_login_backend = "django.contrib.auth.backends.ModelBackend"
    success_url = "/"

    def form_valid(self, form):
        response = super().form_valid(form)
        messages.success(self.request, _("Welcome to QwenHub: your password is set and you are signed in."))
        return response


@team_admin_required
def invite(request):
    """GET the form, POST an invitation (team admins of the chosen team only)."""
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            member = member_invite(team=request.member.team, email=data["email"], username=data["username"],
                                   role=data["role"], request_quota=data["request_quota"],
                                   token_quota=data["token_quota"], actor=request.user, reason=data["reason"])
        except ValidationError as exc:
            errors = getattr(exc, "error_dict", {})
            if "username" in errors:
                form.add_error("username", _("This username is taken."))
            if "email" in errors:
                form.add_error("email", _("Someone with this e-mail address already has an account."))
            if not errors.keys() & {"username", "email"}:
                form.add_error(None, _("The invitation could not be sent: check the fields."))
        else:
            messages.success(request, _("Invitation sent to %(email)s.") % {"email": member.user.email})
            return redirect("invite")
    return render(request, "dashboards/accounts/invite.html", {"form": form, "valid_days": max(1, settings.PASSWORD_RESET_TIMEOUT // 86400)},
                  status=400 if form.errors else 200)
