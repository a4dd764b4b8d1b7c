"""Admin building blocks shared by the apps."""


class ReadOnlyAdminMixin:
    """Rows the admin may look at but never add, change or delete (money, usage, audit)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
