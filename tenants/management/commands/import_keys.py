import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from tenants.management.base import limit_text, service_errors
from tenants.services import api_keys_import, team_get


class Command(BaseCommand):
    help = (
        'Import members and their existing API keys into a team from a JSON file shaped like '
        '{"alice": {"key": "sk-abc123", "quota": 1000, "used": 0}}. Old keys keep working '
        '(stored hashed only), "quota" becomes the monthly request quota (null = unlimited) and '
        '"used" is charged to this month. All or nothing: any bad entry aborts the whole import.'
    )

    def add_arguments(self, parser):
        parser.add_argument("team", help="Slug of the team to import into.")
        parser.add_argument("file", help="Path of the JSON file ('-' reads stdin).")

    def handle(self, *args, team, file, **options):
        text = self._read(file)
        with service_errors():
            members = api_keys_import(team=team_get(slug=team), text=text)
        self.stdout.write(f"Imported {len(members)} member(s) into team {team}:")
        for member in members:
            self.stdout.write(f"  {member.user.get_username()}: {limit_text(member.request_quota)} requests/month")

    def _read(self, file: str) -> str:
        if file == "-":
            return sys.stdin.read()
        try:
            return Path(file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CommandError(f"No such file: {file}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text.") from None
        except OSError as exc:
            raise CommandError(f"Cannot read {file}: {exc.strerror}.") from None
