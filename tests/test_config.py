"""The pilot's configuration file: the example documents every option, and it loads as shipped."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from pilot.config import SCHEMA, ConfigError, PilotConfig, load_config

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "packaging", "pilot.conf.example")


def test_example_documents_every_option():
    text = open(EXAMPLE, encoding="utf-8").read()
    for section, options in SCHEMA.items():
        assert f"[{section}]" in text
        for option in options:
            assert re.search(rf"^#?{option} = ", text, re.M), f"[{section}] {option} is not documented"


def test_example_loads_with_its_defaults(tmp_path):
    text = open(EXAMPLE, encoding="utf-8").read()
    # As shipped (everything commented out), with a contact from the command line.
    config_path = tmp_path / "pilot.conf"
    config_path.write_text(text)
    config = load_config(str(config_path), contact="http://127.0.0.1:9")
    assert config == PilotConfig(contact="http://127.0.0.1:9")


def example_values() -> dict[tuple[str, str], str]:
    """``(section, option) -> value`` of every ``#option = value`` line in the example."""
    found: dict[tuple[str, str], str] = {}
    section = None
    for line in open(EXAMPLE, encoding="utf-8").read().splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header.group(1)
            continue
        option = re.fullmatch(r"#?(\w+) = (.*)", line)
        if option:
            key = (section, option.group(1))
            assert key not in found, f"[{section}] {option.group(1)} is shown twice in the example"
            found[key] = option.group(2)
    return found


def test_example_shows_only_known_options_in_their_sections():
    shown = set(example_values())
    known = {(section, option) for section, options in SCHEMA.items() for option in options}
    assert shown == known


def test_example_defaults_are_the_codes_defaults(tmp_path):
    """Every value the example shows as a default is what the pilot uses when the option is unset.

    Options whose PilotConfig default is None ("no default" in the example)
    show an example value instead; that value must at least be valid.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(PilotConfig)}
    lines: dict[str, list[str]] = {}
    compared = []
    for (section, option), value in example_values().items():
        field, parse = SCHEMA[section][option]
        if field is None or defaults[field] is None:
            parse(value)  # an example value, not a default: it must parse
            continue
        lines.setdefault(section, []).append(f"{option} = {value}")
        compared.append((section, option, field))
    assert len(compared) > 10
    text = "".join(f"[{section}]\n" + "\n".join(options) + "\n" for section, options in lines.items())
    config_path = tmp_path / "pilot.conf"
    config_path.write_text(text)
    config = load_config(str(config_path), contact="http://127.0.0.1:9")
    for section, option, field in compared:
        assert getattr(config, field) == defaults[field], (
            f"[{section}] {option}: the example says {getattr(config, field)!r}, the code's default is "
            f"{defaults[field]!r}"
        )
    assert config == PilotConfig(contact="http://127.0.0.1:9")


@pytest.mark.parametrize("option", ["user", "secret", "secret_file", "realm"])
def test_the_shared_secret_options_of_old_configs_are_one_line_saying_what_replaced_them(tmp_path, option):
    config_path = tmp_path / "pilot.conf"
    config_path.write_text(f"[service]\n{option} = x\ncontact = https://svc.example/\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(config_path))
    (problem,) = caught.value.problems
    assert f"[service] {option} is gone" in problem and "node_key_file" in problem and "node-key" in problem


def test_command_line_contact_overrides_the_file(tmp_path):
    config_path = tmp_path / "pilot.conf"
    config_path.write_text("[service]\ncontact = http://127.0.0.1:1\n")
    assert load_config(str(config_path), contact="http://127.0.0.1:2").contact == "http://127.0.0.1:2"


def test_no_contact_anywhere_is_an_error(tmp_path):
    config_path = tmp_path / "pilot.conf"
    config_path.write_text("[service]\nrequest_timeout = 5\n")
    with pytest.raises(ConfigError, match="no service contact"):
        load_config(str(config_path))
