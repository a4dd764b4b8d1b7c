"""Allocation policies: how a team's month cost is split among its members (pure code, no database).

WARNING: changing a policy changes invoices. A closed period records the policy and its
parameters, so a recompute of an old month must use them, not today's.

Every policy takes the month's total (already rounded to the currency's minor unit) and one
`MemberMonth` per member (usage aggregated in SQL, the period's quota, active days), and
returns a `Split` whose amounts sum exactly to what it allocates (largest remainder,
billing.money.allocate):

- ``usage``: by weighted tokens, prompt × prompt_weight + completion × completion_weight,
  times an optional per-model weight;
- ``quota``: by each member's monthly quota (``quota_unit`` tokens or requests); a member with
  an unlimited quota weighs as the largest finite quota of the team;
- ``seed_rate``: a price per unit = total ÷ the sum of quotas; each member pays what they used
  at that price, and the part nobody used is idle capacity, charged to ``idle_payer_id`` or
  left unallocated;
- ``equal``: equal among the members active in the period;
- ``base_plus_usage``: ``base_share`` of the total split as ``equal``, the rest by ``usage``.

One rule for members who joined, left or were suspended mid-month: the **fixed parts**
(``equal`` and the base of ``base_plus_usage``) are pro rata by the days the member was
active in the period; usage-based parts follow usage, whenever it happened. When nobody used
anything, a usage-based policy falls back to ``equal`` and says so.
"""
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from django.utils.translation import gettext, gettext_lazy, gettext_noop

from billing.money import PRICE_PLACES, ZERO, allocate, minor_unit, quantize

USAGE, QUOTA, SEED_RATE, EQUAL, BASE_PLUS_USAGE = "usage", "quota", "seed_rate", "equal", "base_plus_usage"
POLICIES = (USAGE, QUOTA, SEED_RATE, EQUAL, BASE_PLUS_USAGE)

# The sentences that explain a split. They are stored with their arguments (Explanation), so
# a page or a statement says them in its reader's language; `explanation` keeps the English.
EXPLAIN = {
    USAGE: gettext_noop("The month's cost is split by tokens used, prompt tokens weighted {prompt_weight} and "
                        "completion tokens {completion_weight}{model_note}."),
    QUOTA: gettext_noop("The month's cost is split by each member's monthly {unit} quota."),
    SEED_RATE: gettext_noop("Each {unit_one} costs {price} {currency} (the month's cost divided by the team's total "
                            "quota of {quota_sum} {unit}); the part nobody used ({idle} {currency}) is {idle_note}."),
    EQUAL: gettext_noop("The month's cost is split equally among the members active this month, pro rata by active "
                        "days."),
    BASE_PLUS_USAGE: gettext_noop("{base_share} of the month's cost is split equally among the members active "
                                  "this month (pro rata by active days), the rest by tokens used."),
}
FELL_BACK_KEY, NOBODY_ACTIVE_KEY = "fell_back", "nobody_active"
SENTENCES = {
    **EXPLAIN,
    FELL_BACK_KEY: gettext_noop("Nobody used the server this month, so the cost is split equally among the members "
                                "active this month."),
    NOBODY_ACTIVE_KEY: gettext_noop("Nobody was a member this month: the cost is left unallocated."),
}
FELL_BACK, NOBODY_ACTIVE = SENTENCES[FELL_BACK_KEY], SENTENCES[NOBODY_ACTIVE_KEY]
# Words put into the sentences; translated with them.
PHRASES = {
    "": "",
    "by_model": gettext_noop(" and by model"),
    "token": gettext_noop("token"), "tokens": gettext_noop("tokens"),
    "request": gettext_noop("request"), "requests": gettext_noop("requests"),
    "unallocated": gettext_noop("left unallocated"),
    "payer": gettext_noop("charged to the team's designated payer"),
}
POLICY_NAMES = {
    USAGE: gettext_lazy("by usage"), QUOTA: gettext_lazy("by quota"), SEED_RATE: gettext_lazy("seed rate"),
    EQUAL: gettext_lazy("equal"), BASE_PLUS_USAGE: gettext_lazy("base plus usage"),
}


def policy_name(policy: str) -> str:
    """A policy's name in the active language (the code itself for an unknown one)."""
    return str(POLICY_NAMES.get(policy, policy))


@dataclass(frozen=True)
class Explanation:
    """One of SENTENCES with its arguments: plain values, and PHRASES keys said in the reader's language."""

    sentence: str
    args: dict = field(default_factory=dict)
    phrases: dict = field(default_factory=dict)

    def _say(self, translate) -> str:
        words = {name: translate(PHRASES[key]) if key else "" for name, key in self.phrases.items()}
        return translate(SENTENCES[self.sentence]).format(**self.args, **words)

    @property
    def english(self) -> str:
        return self._say(str)

    def translated(self) -> str:
        """The sentence in the active language."""
        return self._say(gettext)

    def with_args(self, **args) -> "Explanation":
        return Explanation(self.sentence, {**self.args, **args}, self.phrases)

    def to_json(self) -> dict:
        return {"sentence": self.sentence, "args": self.args, "phrases": self.phrases}

    @classmethod
    def from_json(cls, data: dict | None) -> "Explanation | None":
        """None for what this code cannot say (a period closed before explanations were stored)."""
        try:
            explanation = cls(data["sentence"], dict(data.get("args") or {}), dict(data.get("phrases") or {}))
            explanation.english  # noqa: B018 - every sentence, argument and phrase is known
        except (KeyError, TypeError, IndexError, ValueError):
            return None
        return explanation


@dataclass(frozen=True)
class ModelUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class MemberMonth:
    """One member's month as the policies see it."""

    member_id: int
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    request_quota: int | None = None  # the period's limits; None = unlimited
    token_quota: int | None = None
    active_days: int = 1  # days of the period the member was active (fixed parts are pro rata)

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.by_model.values())

    @property
    def tokens(self) -> int:
        return sum(m.prompt_tokens + m.completion_tokens for m in self.by_model.values())


@dataclass(frozen=True)
class PolicyParams:
    kind: str = USAGE
    prompt_weight: Decimal = Decimal(1)
    completion_weight: Decimal = Decimal(1)
    model_weights: dict[str, Decimal] = field(default_factory=dict)  # model name → weight (default 1)
    base_share: Decimal = Decimal("0.5")  # base_plus_usage: the part split equally
    quota_unit: str = "tokens"  # quota and seed_rate: "tokens" or "requests"
    idle_payer_id: int | None = None  # seed_rate: who pays the idle capacity (None: unallocated)


@dataclass
class Split:
    amounts: dict[int, Decimal]  # member id → amount (the idle payer's includes the idle part)
    policy: str  # the policy applied (equal after a fallback)
    explained: Explanation
    idle: Decimal = ZERO  # seed_rate: cost of the capacity nobody used
    unallocated: Decimal = ZERO  # what no member pays
    fell_back: bool = False

    @property
    def allocated(self) -> Decimal:
        return sum(self.amounts.values(), ZERO)

    @property
    def explanation(self) -> str:
        return self.explained.english


IDLE = "idle"  # the key of seed_rate's unallocated idle capacity in a split's weights


def usage_weight(usage: ModelUsage, model: str, params: PolicyParams) -> Decimal:
    """The weighted tokens of one member's use of one model."""
    weight = params.model_weights.get(model, Decimal(1))
    return (usage.prompt_tokens * params.prompt_weight + usage.completion_tokens * params.completion_weight) * weight


def usage_weights(members: list[MemberMonth], params: PolicyParams) -> dict[int, Fraction]:
    return {m.member_id: Fraction(sum((usage_weight(u, name, params) for name, u in m.by_model.items()), ZERO))
            for m in members}


def _plain(number: Decimal) -> str:
    """A number for a sentence: 10, 0.25 (no exponent, no trailing zeros)."""
    return format(number.normalize(), "f")


def _normalised(weights: dict) -> dict:
    total = sum(weights.values(), Fraction(0))
    return {k: Fraction(w) / total for k, w in weights.items()} if total else {k: Fraction(0) for k in weights}


def _day_weights(members: list[MemberMonth]) -> dict[int, Fraction]:
    return {m.member_id: Fraction(max(0, m.active_days)) for m in members}


def _quota(member: MemberMonth, unit: str) -> int | None:
    return member.token_quota if unit == "tokens" else member.request_quota


def _used(member: MemberMonth, unit: str) -> int:
    return member.tokens if unit == "tokens" else member.requests


# Each policy returns (exact weights by member id, plus IDLE for a part left unallocated;
# the policy applied; its Explanation, seed_rate's without {idle} yet), or None when nothing was used.
# split_cost allocates once, so every amount is within one minor unit of its exact share.

def _equal(total, members, params, currency):
    return _day_weights(members), EQUAL, Explanation(EQUAL)


def _usage(total, members, params, currency):
    weights = usage_weights(members, params)
    if not any(weights.values()):
        return None
    args = {"prompt_weight": str(params.prompt_weight), "completion_weight": str(params.completion_weight)}
    return weights, USAGE, Explanation(USAGE, args, {"model_note": "by_model" if params.model_weights else ""})


def _quota_split(total, members, params, currency):
    unit = params.quota_unit
    largest = max((q for m in members if (q := _quota(m, unit)) is not None), default=0)
    weights = {m.member_id: Fraction(q if (q := _quota(m, unit)) is not None else largest) for m in members}
    if not any(weights.values()):
        return None
    return weights, QUOTA, Explanation(QUOTA, phrases={"unit": unit[:-1]})


def _seed_rate(total, members, params, currency):
    unit = params.quota_unit
    quotas = [_quota(m, unit) for m in members]
    used = {m.member_id: Fraction(_used(m, unit)) for m in members}
    used_sum = sum(used.values(), Fraction(0))
    if None in quotas or not sum(quotas) or not used_sum:
        # No finite total quota to price by (or nothing used): by use, or the equal fallback.
        return _usage(total, members, PolicyParams(), currency)
    quota_sum = sum(quotas)
    if used_sum >= quota_sum:  # top-ups took the team to or past its total quota: everything is used
        weights, idle_share = _normalised(used), Fraction(0)
    else:
        weights, idle_share = {k: u / quota_sum for k, u in used.items()}, 1 - used_sum / quota_sum
    payer = params.idle_payer_id if params.idle_payer_id in weights else None
    if idle_share:
        weights[IDLE if payer is None else payer] = weights.get(payer, Fraction(0)) + idle_share
    price = _plain((total / quota_sum).quantize(Decimal(1).scaleb(-PRICE_PLACES)))
    explanation = Explanation(SEED_RATE, {"price": price, "currency": currency, "quota_sum": quota_sum},
                              {"unit_one": unit[:-1], "unit": unit, "idle_note": "unallocated" if payer is None else "payer"})
    return weights, SEED_RATE, explanation


def _base_plus_usage(total, members, params, currency):
    usage = usage_weights(members, params)
    if not any(usage.values()):
        return None
    share = Fraction(params.base_share)
    days, usage = _normalised(_day_weights(members)), _normalised(usage)
    weights = {k: share * days[k] + (1 - share) * usage[k] for k in usage}
    percent = _plain(params.base_share * 100)
    return weights, BASE_PLUS_USAGE, Explanation(BASE_PLUS_USAGE, {"base_share": f"{percent}%"})


_POLICY = {USAGE: _usage, QUOTA: _quota_split, SEED_RATE: _seed_rate, EQUAL: _equal, BASE_PLUS_USAGE: _base_plus_usage}


def split_cost(total: Decimal, members: list[MemberMonth], params: PolicyParams, currency: str) -> Split:
    """Split the month's total among members under params; amounts plus unallocated sum to total."""
    if total != quantize(total, currency):
        raise ValueError(f"round the month's total to {minor_unit(currency)} {currency} first")
    if params.kind not in POLICIES:
        raise ValueError(f"unknown allocation policy {params.kind!r}")
    zero = ZERO * minor_unit(currency)
    planned = _POLICY[params.kind](total, members, params, currency)
    fell_back = planned is None
    weights, policy, explanation = (_day_weights(members), EQUAL, Explanation(FELL_BACK_KEY)) if fell_back else planned
    if not any(weights.values()):
        return Split({m.member_id: zero for m in members}, policy, Explanation(NOBODY_ACTIVE_KEY), unallocated=total,
                     fell_back=fell_back)
    parts = allocate(total, weights, currency)
    unallocated = parts.pop(IDLE, zero)
    idle = unallocated
    if policy == SEED_RATE and params.idle_payer_id in parts:  # the payer's amount includes it
        idle = quantize(_idle_of(total, members, params), currency)
    if policy == SEED_RATE:
        explanation = explanation.with_args(idle=str(idle))
    return Split(parts, policy, explanation, idle=idle, unallocated=unallocated,
                 fell_back=fell_back)


def _idle_of(total: Decimal, members: list[MemberMonth], params: PolicyParams) -> Decimal:
    """The cost of the capacity nobody used, for the sentence and the admin summary."""
    quota_sum = sum(_quota(m, params.quota_unit) or 0 for m in members)
    used_sum = sum(_used(m, params.quota_unit) for m in members)
    return total * max(0, quota_sum - used_sum) / quota_sum if quota_sum else ZERO


def split_by_model(amount: Decimal, member: MemberMonth, params: PolicyParams, currency: str) -> dict[str, Decimal]:
    """Split one member's amount over the models they used (by weighted tokens); sums to amount."""
    weights = {name: usage_weight(u, name, params) for name, u in member.by_model.items()}
    if not any(weights.values()):
        weights = {name: Decimal(u.requests) for name, u in member.by_model.items()}
    if not any(weights.values()):
        return {}
    return allocate(amount, weights, currency)
