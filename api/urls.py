"""The management REST API under /api/v1/ and its OpenAPI schema under /api/schema/."""
app_name = "api"
urlpatterns = []
