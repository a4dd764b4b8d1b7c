"""Writes for teams, members, keys and quotas (a module each); every state change leaves an AuditEvent.

Re-exported here, so callers write `from tenants.services import api_key_issue`.
"""
from tenants.services.teams import (  # noqa: F401
    COST_INVALID, MEMBER_EXISTS, MEMBER_OTHER_TEAM, TEAM_EXISTS, TEAM_UNKNOWN, USER_AMBIGUOUS, USER_EXISTS,
    USER_UNKNOWN, member_add, member_create, member_get, member_update, parse_money, team_create, team_get,
    team_update,
)
from tenants.services.keys import (  # noqa: F401
    IMPORT_DUPLICATE_NAME, IMPORT_ENTRY_INVALID, IMPORT_KEY_EXISTS, IMPORT_NOT_OBJECT, KEY_ALREADY_REVOKED,
    KEY_AMBIGUOUS, KEY_UNKNOWN, api_key_get_by_prefix, api_key_issue, api_key_revoke, api_key_update,
    api_keys_import,
)
from tenants.services.quotas import (  # noqa: F401
    QUOTA_AMOUNT_INVALID, QUOTA_CHANGE_REASON, QUOTA_UNLIMITED, quota_counter_apply_quota_change, quota_counter_carry,
    quota_counter_charge_imported, quota_counter_open, quota_counters_open_for_team, quota_reset, quota_top_up,
)
from tenants.services.invites import (  # noqa: F401
    EMAIL_EXISTS, INVITE_TOKENS, invite_pending, invites_resend_for_email, member_invite, member_invite_resend,
)
