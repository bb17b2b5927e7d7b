"""The docs a user follows stay true to the code."""

from pathlib import Path

from streams.settings import env_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_with_its_variable():
    text = (ROOT / "docs" / "settings.md").read_text()
    missing = sorted(name for name in env_names() if f"`{name}`" not in text)
    assert not missing, f"add to docs/settings.md: {missing}"


def test_readme_commands_exist():
    from safeswap.cli import app

    readme = (ROOT / "README.md").read_text()
    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    groups = {g.name for g in app.registered_groups}
    in_code = False
    for line in readme.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        words = line.strip().split() if in_code else []
        if words and words[0].startswith("SAFESWAP_"):
            words = words[1:]
        if len(words) >= 2 and words[0] == "safeswap" and not words[1].startswith("-"):
            assert words[1] in commands | groups, f"README runs `safeswap {words[1]}`, which does not exist"
