"""How a split is explained: English as it always was, the reader's language on pages and statements."""
from decimal import Decimal

import pytest
from django.utils import translation

from billing.models import BillingPeriod, StatementEmail
from billing.policies import Explanation, MemberMonth, ModelUsage, PolicyParams, policy_name, split_cost
from billing.selectors import cost_report
from billing.services import period_statements_send
from billing.services.statements import statement_message
from billing.tests.conftest import NOV, finalized_month

D = Decimal
ZH = {"HTTP_ACCEPT_LANGUAGE": "zh-CN,zh;q=0.9"}
MEMBERS = [MemberMonth(1, {"qwen": ModelUsage(30, 10, 10)}, request_quota=100, token_quota=1000),
           MemberMonth(2, {"big": ModelUsage(15, 5, 5)}, request_quota=100, token_quota=3000),
           MemberMonth(3, {}, request_quota=100, token_quota=None)]
SEED = "Each request costs 10 CNY (the month's cost divided by the team's total quota of 300 requests); the part " \
       "nobody used (2550.00 CNY) is "
# (params, members, the English sentence, words the Chinese one holds)
CASES = {
    "usage": (PolicyParams(kind="usage", completion_weight=D(2)), MEMBERS,
              "The month's cost is split by tokens used, prompt tokens weighted 1 and completion tokens 2.",
              ["按使用的 Token 分摊", "生成 Token 权重为 2"]),
    "usage by model": (PolicyParams(kind="usage", model_weights={"big": D(3)}), MEMBERS,
                       "The month's cost is split by tokens used, prompt tokens weighted 1 and completion tokens 1 "
                       "and by model.", ["并按模型加权"]),
    "quota": (PolicyParams(kind="quota", quota_unit="requests"), MEMBERS,
              "The month's cost is split by each member's monthly request quota.", ["每月请求配额"]),
    "seed rate": (PolicyParams(kind="seed_rate", quota_unit="requests"), MEMBERS, SEED + "left unallocated.",
                  ["每个请求的价格为 10 CNY", "300 个请求", "2550.00 CNY", "不分摊"]),
    "seed rate, a payer": (PolicyParams(kind="seed_rate", quota_unit="requests", idle_payer_id=3), MEMBERS,
                           SEED + "charged to the team's designated payer.", ["由团队指定的付款人承担"]),
    "equal": (PolicyParams(kind="equal"), MEMBERS,
              "The month's cost is split equally among the members active this month, pro rata by active days.",
              ["平均分摊", "活跃天数"]),
    "base plus usage": (PolicyParams(kind="base_plus_usage", base_share=D("0.25")), MEMBERS,
                        "25% of the month's cost is split equally among the members active this month (pro rata "
                        "by active days), the rest by tokens used.", ["本月费用的 25% 由"]),
    "fell back": (PolicyParams(kind="usage"), [MemberMonth(1, {}), MemberMonth(2, {})],
                  "Nobody used the server this month, so the cost is split equally among the members active this "
                  "month.", ["本月无人使用服务器"]),
    "nobody": (PolicyParams(kind="usage"), [MemberMonth(1, {}, active_days=0)],
               "Nobody was a member this month: the cost is left unallocated.", ["本月没有成员"]),
}


@pytest.mark.parametrize("case", CASES)
def test_each_sentence_is_the_english_it_was_and_chinese_for_a_chinese_reader(case):
    params, members, english, chinese = CASES[case]
    split = split_cost(D("3000.00"), members, params, "CNY")
    assert split.explanation == english
    stored = Explanation.from_json(split.explained.to_json())
    assert stored == split.explained and stored.english == english
    with translation.override("zh-hans"):
        said = stored.translated()
    assert all(words in said for words in chinese), said
    assert not any(c.isascii() and c.isalpha() for c in said.replace("Token", "").replace("CNY", "")), said
    with translation.override("en"):
        assert stored.translated() == english


@pytest.mark.parametrize("data", [{}, None, {"sentence": "gone"}, {"sentence": "usage", "args": {}},
                                  {"sentence": "quota", "phrases": {"unit": "furlong"}}, {"sentence": ["usage"]}])
def test_what_this_code_cannot_say_is_none(data):
    assert Explanation.from_json(data) is None


def test_policy_names_are_translated():
    assert policy_name("seed_rate") == "seed rate"
    with translation.override("zh-hans"):
        assert policy_name("seed_rate") == "单价" and policy_name("usage") == "按用量"
        assert policy_name("something-new") == "something-new"


@pytest.mark.django_db
def test_a_closed_period_keeps_the_sentence_and_says_it_in_the_readers_language(client):
    period, members = finalized_month()
    assert period.explanation_parts["sentence"] == "usage"
    assert period.explanation_text == period.explanation.replace("\n", " ")
    client.force_login(members["alice"].user)
    invoice = period.invoices.get(member=members["alice"])
    page = client.get(f"/invoices/{invoice.pk}/", **ZH).content.decode()
    assert "按策略“按用量”分摊：" in page and "本月费用按使用的 Token 分摊" in page
    assert period.explanation not in page
    english = client.get(f"/invoices/{invoice.pk}/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "the policy “by usage”" in english and "The month&#x27;s cost is split by tokens used" in english
    team_page = client.get(f"/team/periods/{period.pk}/", **ZH).content.decode()
    assert "本月费用按使用的 Token 分摊" in team_page
    with translation.override("zh-hans"):
        assert cost_report(team=period.team, start=NOV).explanation_text.startswith("本月费用按使用的 Token 分摊")


@pytest.mark.django_db
def test_a_period_closed_before_the_sentence_was_kept_shows_the_stored_text(client):
    period, members = finalized_month()
    BillingPeriod.objects.filter(pk=period.pk).update(explanation_parts={}, explanation="Split the old way.")
    period.refresh_from_db()
    with translation.override("zh-hans"):
        assert period.explanation_text == "Split the old way."
        assert cost_report(team=period.team, start=NOV).explanation_text == "Split the old way."
    client.force_login(members["alice"].user)
    invoice = period.invoices.get(member=members["alice"])
    assert "Split the old way." in client.get(f"/invoices/{invoice.pk}/", **ZH).content.decode()


@pytest.mark.django_db
def test_a_chinese_statement_explains_the_split_in_chinese(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.LANGUAGE_CODE = "zh-hans"
    period, members = finalized_month(kind="equal")
    period_statements_send(period=period)
    invoice = period.invoices.get(member=members["bob"])
    message = statement_message(email=StatementEmail.objects.get(invoice=invoice), to=["bob@example.com"])
    assert "本月费用由本月活跃的成员平均分摊" in message.body and period.explanation not in message.body
    summary = statement_message(email=StatementEmail.objects.get(period=period, kind=StatementEmail.Kind.SUMMARY),
                                to=["alice@example.com"])
    assert "本月费用由本月活跃的成员平均分摊" in summary.body
