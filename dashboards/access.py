"""Who is looking: the membership a page is for, and the two roles' gates.

A person may belong to several teams; the page shows one membership at a time, the one
chosen with the team switcher (kept in the session) or else their first active one. Views
read `request.member` (set here) and never take a member or team id from the URL for
themselves: an object of another member or team is looked up through the membership and
is a 404, never a 403, so a page does not confirm that it exists.
"""
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import render

from tenants.models import Member
from tenants.selectors import memberships_for_user

SESSION_KEY = "qwenhub_team"


def current_membership(request) -> Member | None:
    """The membership the pages show (the switcher's choice, else the first by team slug)."""
    memberships = list(memberships_for_user(user=request.user))
    request.memberships = memberships
    chosen = request.session.get(SESSION_KEY)
    for member in memberships:
        if member.team.slug == chosen:
            return member
    return memberships[0] if memberships else None


def member_required(view):
    """Signed in and an active member of a team: request.member is that membership."""
    @login_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        request.member = current_membership(request)
        if request.member is None:
            return render(request, "dashboards/no_team.html", status=403)
        return view(request, *args, **kwargs)
    return wrapped


def team_admin_required(view):
    """An active admin of the chosen team (a member is refused with 403: the page exists for everyone)."""
    @member_required
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.member.role != Member.Role.ADMIN:
            raise PermissionDenied
        return view(request, *args, **kwargs)
    return wrapped


def get_or_404(queryset, **lookup):
    """One row of a queryset already narrowed to the viewer's member or team, else 404."""
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404 from None
