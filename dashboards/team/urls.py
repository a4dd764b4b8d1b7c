from django.urls import path

from dashboards.team import views

app_name = "team"
urlpatterns = [
    path("", views.team_home, name="home"),
]
