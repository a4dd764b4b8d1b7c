"""Who is calling: the membership an API call acts as, and the team admin's gate.

- A key authenticates as its member (that team's membership only).
- A session acts as the user's membership of `?team=<slug>`, else their first active one.
- Team endpoints (/teams/<slug>/...) need the caller's membership of that team: none is a
  404 (the API does not confirm another team exists); a membership that is not an admin is
  a 403. Objects are always looked up through the caller's member or team, so another
  member's or team's object is a 404, never a 403.
"""
from django.core.validators import slug_re
from django.http import Http404
from django.utils.translation import gettext_lazy as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter
from rest_framework import exceptions
from rest_framework.views import APIView

from tenants.models import ApiKey, Member
from tenants.selectors import membership_for_user, memberships_for_user

NO_MEMBERSHIP = _("You are not an active member of any team.")
NOT_ADMIN = _("Only this team's admins may do this.")

TEAM_PARAMETER = OpenApiParameter(
    "team", OpenApiTypes.STR, OpenApiParameter.QUERY, required=False,
    description="Session only: the slug of the membership to act as (default: your first team). "
                "A key always acts as its own membership.")


def caller_membership(request) -> Member:
    """The membership this request acts as (see the module docstring)."""
    if isinstance(request.auth, ApiKey):
        return request.auth.member
    slug = request.query_params.get("team")
    if slug:
        if not slug_re.match(slug):  # not a slug (a NUL byte would not even reach PostgreSQL): no such team
            raise Http404
        member = membership_for_user(user=request.user, team_slug=slug)
        if member is None:
            raise Http404
        return member
    member = memberships_for_user(user=request.user).select_related("user").first()
    if member is None:
        raise exceptions.PermissionDenied(NO_MEMBERSHIP)
    return member


def team_admin_membership(request, slug: str) -> Member:
    """The caller's admin membership of team `slug`: 404 if not a member of it, 403 if not its admin."""
    if isinstance(request.auth, ApiKey):
        member = request.auth.member
        if member.team.slug != slug:
            raise Http404
    else:
        member = membership_for_user(user=request.user, team_slug=slug)
        if member is None:
            raise Http404
    if member.role != Member.Role.ADMIN:
        raise exceptions.PermissionDenied(NOT_ADMIN)
    return member


class MemberApi(APIView):
    """An endpoint about the caller's own membership (`/api/v1/me/...`)."""

    access = "member"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        request.member = caller_membership(request)


class TeamAdminApi(APIView):
    """An endpoint of one team's admins (`/api/v1/teams/<slug>/...`); request.member is the admin."""

    access = "team_admin"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        request.member = team_admin_membership(request, kwargs["slug"])
        request.team = request.member.team


class OrganizationApi(APIView):
    """OpenAI-style organization endpoints: the caller's membership must be its team's admin."""

    access = "organization_admin"

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        member = caller_membership(request)
        if member.role != Member.Role.ADMIN:
            raise exceptions.PermissionDenied(NOT_ADMIN)
        request.member, request.team = member, member.team


def get_or_404(queryset, **lookup):
    """One row of a queryset already narrowed to the caller's member or team, else 404."""
    try:
        return queryset.get(**lookup)
    except (queryset.model.DoesNotExist, ValueError, TypeError):
        raise Http404 from None
