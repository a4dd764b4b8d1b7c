"""The team admin's pages: every member's month, the cost split, the GPU's health, and the team's actions."""
from django.shortcuts import render

from dashboards.access import team_admin_required


@team_admin_required
def team_home(request):
    return render(request, "dashboards/team/home.html", {})
