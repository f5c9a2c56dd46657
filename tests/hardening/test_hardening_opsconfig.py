"""The operational settings (key manager, metrics listener, rate limits) are checked before start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from hsm_support import softhsm_module

from tessera.sdk.config import ConfigError, load_settings
from tessera.server.config import SETTINGS, build_config


def _config(tmp_path: Path, **values: object) -> object:
    base: dict[str, object] = {
        "trust_domain": "example.org",
        "data_dir": str(tmp_path / "d"),
        "socket": "/tmp/thard-x/api.sock",
    }
    base.update({k: v for k, v in values.items()})
    return build_config(load_settings("server", SETTINGS, None, base))


def test_defaults_are_disk_keys_no_metrics_and_generous_limits(tmp_path: Path) -> None:
    ops = _config(tmp_path).ops  # type: ignore[attr-defined]
    assert ops.key_manager == "disk" and ops.metrics_host is None
    assert ops.attestation_rate_limit == 60 and ops.signing_rate_limit == 20000


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"key_manager": "tpm"}, "key_manager: expected disk or pkcs11"),
        ({"key_manager": "pkcs11"}, "pkcs11_module: required"),
        ({"key_manager": "pkcs11", "pkcs11_module": "/nonexistent.so"}, "pkcs11_module: /nonexistent.so is not"),
        ({"metrics_bind_address": "nope"}, "metrics_bind_address: expected HOST:PORT"),
        ({"metrics_bind_address": "127.0.0.1:99999"}, "metrics_bind_address: port 99999 is out of range"),
        ({"attestation_rate_limit": "-1"}, "attestation_rate_limit: must be 0"),
        ({"signing_rate_limit": "lots"}, "signing_rate_limit: expected a whole number"),
    ],
)
def test_bad_values_stop_start_up_with_one_line(tmp_path: Path, values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _config(tmp_path, **values)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(softhsm_module() is None, reason="SoftHSM2 missing")
def test_pkcs11_settings_and_a_literal_pin_is_refused_without_echo(tmp_path: Path) -> None:
    module = softhsm_module()
    base = {"key_manager": "pkcs11", "pkcs11_module": module, "pkcs11_token_label": "t"}
    with pytest.raises(ConfigError, match="pkcs11_pin: required"):
        _config(tmp_path, **base)
    with pytest.raises(ConfigError, match="literal PIN is not accepted") as info:
        _config(tmp_path, **base, pkcs11_pin="314159")
    assert "314159" not in str(info.value)
    ops = _config(tmp_path, **base, pkcs11_pin="env:TESSERA_PKCS11_PIN").ops  # type: ignore[attr-defined]
    assert ops.key_manager == "pkcs11" and ops.pkcs11_pin == "env:TESSERA_PKCS11_PIN"
    assert "314159" not in repr(ops)
