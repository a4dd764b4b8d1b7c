from django.urls import path

from dashboards.member import views

app_name = "member"
urlpatterns = [
    path("", views.member_home, name="home"),
    path("switch-team/", views.team_switch, name="switch_team"),
]
