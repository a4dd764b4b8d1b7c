"""The pages scenario at a tiny scale: this month's rows are generated and both pages render with their counts."""
import pytest

from bench import pagesdata
from billing.models import UsageRecord
from tenants.periods import period_start_for


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.ALLOWED_HOSTS = ["testserver"]  # render() widens it; the fixture puts it back


@pytest.mark.django_db
def test_tiny_month_renders_both_pages():
    gen = pagesdata.generate(members=4, rows=300, slug="tiny-pages", vacuum=False)
    assert UsageRecord.objects.filter(team_id=gen["team_id"], period_start=period_start_for("Asia/Shanghai")).count() == 300
    out = pagesdata.render(slug="tiny-pages", repeat=2)
    for page in ("team", "member"):
        assert out[page]["queries"] > 0 and out[page]["bytes"] > 500 and out[page]["max_s"] >= out[page]["median_s"]
        assert out[page]["cold_queries"] > out[page]["queries"]  # warm renders read the cached month
    assert out["member_username"] == "tiny-pages-003"  # the first member who is not an admin
