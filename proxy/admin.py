"""Admin for upstreams and model names. The upstream's api_key is write-only here."""
from django import forms
from django.contrib import admin

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.admin import SecretLookupsRefusedMixin

MASK = "••••••••"


class SecretField(forms.CharField):
    """A password-style field: the stored value is never rendered, and empty input keeps it."""

    widget = forms.PasswordInput(render_value=False)

    def has_changed(self, initial, data):
        return bool(data)


class UpstreamForm(forms.ModelForm):
    api_key = SecretField(required=False, max_length=500, label="API key",
                          help_text="vLLM's --api-key. Leave empty to keep the current one.")
    clear_api_key = forms.BooleanField(required=False, label="Remove the API key")

    class Meta:
        model = Upstream
        fields = ["name", "base_url", "api_key", "enabled", "max_concurrency"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial.pop("api_key", None)  # never sent back to the browser, not even by accident

    def clean(self):
        data = super().clean()
        if data.get("clear_api_key"):
            data["api_key"] = ""
        elif not data.get("api_key"):
            data["api_key"] = self.instance.api_key  # "" for a new upstream
        return data


def masked(value: str) -> str:
    return MASK if value else "—"


@admin.register(Upstream)
class UpstreamAdmin(SecretLookupsRefusedMixin, admin.ModelAdmin):
    form = UpstreamForm
    refused_lookup_parts = SecretLookupsRefusedMixin.refused_lookup_parts | {"api_key"}
    list_display = ["name", "base_url", "api_key_masked", "enabled", "max_concurrency", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "base_url"]  # never api_key
    list_select_related = True
    readonly_fields = ["api_key_masked", "created_at", "updated_at"]

    def get_fields(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            # The read-only view would print every field's value, so leave the key out.
            return ["name", "base_url", "api_key_masked", "enabled", "max_concurrency", "created_at", "updated_at"]
        return ["name", "base_url", "api_key_masked", "api_key", "clear_api_key", "enabled", "max_concurrency",
                "created_at", "updated_at"]

    @admin.display(description="API key")
    def api_key_masked(self, upstream):
        return masked(upstream.api_key)


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    extra = 0


class ModelRouteInline(admin.TabularInline):
    model = ModelRoute
    extra = 0
    fields = ["upstream", "served_name"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("upstream", "model")


@admin.register(PublicModel)
class PublicModelAdmin(admin.ModelAdmin):
    list_display = ["name", "alias_list", "default_max_tokens", "max_model_len", "created_at"]
    search_fields = ["name", "aliases__alias"]
    list_select_related = True
    inlines = [ModelRouteInline, ModelAliasInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("aliases")

    @admin.display(description="aliases")
    def alias_list(self, model):
        return ", ".join(sorted(a.alias for a in model.aliases.all())) or "—"


@admin.register(ModelRoute)
class ModelRouteAdmin(admin.ModelAdmin):
    list_display = ["model", "upstream", "served_name", "created_at"]
    list_filter = ["upstream"]
    search_fields = ["model__name", "served_name", "upstream__name"]
    list_select_related = ["model", "upstream"]


@admin.register(ModelAlias)
class ModelAliasAdmin(admin.ModelAdmin):
    list_display = ["alias", "model"]
    search_fields = ["alias", "model__name"]
    list_select_related = ["model"]
