"""config.yaml: the seed's file as written, ${VAR} expansion, refusals that name the key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from core.config import Config, load_config, parse_config
from core.errors import ConfigError
from tests.peers import BIN, ROOT

EXAMPLE = ROOT / "deployments" / "config.example.yaml"


def test_seed_config_parses_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSPHERE_PASSWORD", "s3cret-pass")
    # the seed's config.yaml with its indentation restored (the seed text lost it)
    settings = load_config(EXAMPLE)
    assert settings.daemon.address == "0.0.0.0:8080"
    assert settings.daemon.workers == 4
    assert settings.providers.vsphere is not None
    assert settings.providers.vsphere.password.get_secret_value() == "s3cret-pass"
    assert "s3cret-pass" not in repr(settings)
    assert settings.hyper2kvm.poll_interval == 5.0
    assert settings.hyper2kvm.job_timeout == 7200.0
    assert settings.export.chunk_size == 10485760
    assert settings.export.concurrent_exports == 2
    assert str(settings.database.path) == "/var/lib/hypervisord/hypersdk.db"
    assert settings.webhooks[0].events == ["job.failed"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"daemon": {"wrkers": 4}}, "daemon.wrkers: unknown key"),
        ({"daemon": {"workers": "many"}}, "daemon.workers:"),
        ({"daemon": {"address": "8080"}}, "daemon.address:"),
        ({"hyper2kvm": {"default_format": "vdi"}}, "hyper2kvm.default_format:"),
        ({"hyper2kvm": {"poll_interval": "soon"}}, "hyper2kvm.poll_interval:"),
        ({"surprise": {}}, "surprise: unknown key"),
        ({"providers": {"vsphere": {"host": "h", "username": "u"}}},
         "providers.vsphere.password: field required"),
    ],
)
def test_bad_config_is_refused_naming_the_key(document: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert message.lower() in str(caught.value).lower()


def test_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match=r"providers.vsphere.password: environment variable "
                                          r"NOPE_PASSWORD is not set"):
        parse_config({"providers": {"vsphere": {"host": "h", "username": "u",
                                                "password": "${NOPE_PASSWORD}"}}})


def test_defaults_without_a_file() -> None:
    settings = load_config(None)
    assert settings.hyper2kvm.default_format == "qcow2"
    assert settings.providers.local is not None
    assert settings.export.base_path.name == "exports"


def test_hypervisord_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("daemon:\n  address: '127.0.0.1:1'\n  log_levle: info\n")
    done = subprocess.run([str(BIN / "hypervisord"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "daemon.log_levle: unknown key" in done.stderr
    assert "Traceback" not in done.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("daemon: [unclosed\n")
    done = subprocess.run([str(BIN / "hypervisord"), "--config", str(broken)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and re.search(r"not valid YAML", done.stderr)
    done = subprocess.run([str(BIN / "hypervisord"), "--config", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read config" in done.stderr


def test_only_transient_export_failures_are_retried() -> None:
    from prefect.states import Failed

    from core.errors import AuthFailed, NotFound, Transient
    from tasks.export import only_transient

    assert only_transient(None, None, Failed(data=Transient("connection reset")))
    assert only_transient(None, None, Failed(data=TimeoutError("slow")))
    assert not only_transient(None, None, Failed(data=NotFound("gone")))
    assert not only_transient(None, None, Failed(data=AuthFailed("bad password")))


def test_hypervisord_says_so_when_prefect_is_unreachable(tmp_path: Path) -> None:
    import os

    from tests.peers import free_port, write_config

    config = write_config(tmp_path, port=free_port(), api_key="k")
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    done = subprocess.run([str(BIN / "hypervisord"), "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot reach the Prefect server at http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_provider_that_is_not_configured_is_refused_clearly() -> None:
    from core.errors import InvalidRequest
    from providers.base import get_provider

    with pytest.raises(InvalidRequest, match="provider 'hyperv' is not configured"):
        get_provider("hyperv", Config())
