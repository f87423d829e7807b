"""The pilot's configuration file: the example documents every option, and it loads as shipped."""

from __future__ import annotations

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
    # Uncomment only the options whose example value is the default, plus a secret and contact.
    config_path = tmp_path / "pilot.conf"
    config_path.write_text(text.replace("#secret = change-me", "secret = change-me"))
    config = load_config(str(config_path), contact="http://127.0.0.1:9")
    assert config == PilotConfig(contact="http://127.0.0.1:9", secret="change-me")


def test_secret_file_is_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("  from-a-file\n")
    config_path = tmp_path / "pilot.conf"
    config_path.write_text(f"[service]\nsecret_file = {secret}\ncontact = https://svc.example/\n")
    config = load_config(str(config_path))
    assert (config.secret, config.contact) == ("from-a-file", "https://svc.example")


def test_command_line_contact_overrides_the_file(tmp_path):
    config_path = tmp_path / "pilot.conf"
    config_path.write_text("[service]\nsecret = x\ncontact = http://127.0.0.1:1\n")
    assert load_config(str(config_path), contact="http://127.0.0.1:2").contact == "http://127.0.0.1:2"


def test_no_contact_anywhere_is_an_error(tmp_path):
    config_path = tmp_path / "pilot.conf"
    config_path.write_text("[service]\nsecret = x\n")
    with pytest.raises(ConfigError, match="no service contact"):
        load_config(str(config_path))
