"""Template context shared by every dashboard page (no queries: views set request.member)."""


def dashboard(request):
    member = getattr(request, "member", None)
    return {
        "membership": member,
        "memberships": getattr(request, "memberships", ()),
        "team": member.team if member else None,
        # Every time a person reads is in the team's time zone, labelled as such (base.html).
        "team_timezone": member.team.timezone if member else "UTC",
        "is_team_admin": bool(member and member.role == member.Role.ADMIN),
    }
