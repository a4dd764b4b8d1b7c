"""The member's own pages: this month's quota, their keys and what admins changed, with who and why."""
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from dashboards.access import SESSION_KEY, member_required
from tenants.selectors import member_history, member_keys, member_quota_this_month


@member_required
def member_home(request):
    member = request.member
    return render(request, "dashboards/member/home.html", {
        "quota": member_quota_this_month(member=member), "keys": list(member_keys(member=member)),
        "history": list(member_history(member=member)), "now": timezone.now(),
    })


@require_POST
@member_required
def team_switch(request):
    """Show another of the person's memberships (only one of their own: anything else is ignored)."""
    slug = request.POST.get("team", "")
    if any(m.team.slug == slug for m in request.memberships):
        request.session[SESSION_KEY] = slug
    target = request.POST.get("next") or request.META.get("HTTP_REFERER") or "/"
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                           require_https=request.is_secure()):
        target = "/"
    return redirect(target)
