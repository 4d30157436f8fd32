"""Settings refuse what would silently disable a limit or a guard (pure)."""

from __future__ import annotations

import pytest

from tokenchat.server.config import Settings

SECRET = "s" * 32


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("name", ["COMMANDS_PER_S", "REDIS_TIMEOUT_S", "HTTP_CREATES_PER_S"])
def test_numeric_settings_must_be_finite(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=f"TOKENCHAT_{name} must be a finite number"):
        Settings.from_env({f"TOKENCHAT_{name}": raw})


def test_every_float_setting_is_checked() -> None:
    floats = [f for f, kind in Settings.__annotations__.items() if kind == "float"]
    assert "commands_per_s" in floats
    for name in floats:
        with pytest.raises(ValueError, match="finite"):
            Settings(**{name: float("nan")})


def test_a_short_jwt_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Settings.from_env({"TOKENCHAT_JWT_SECRET": "s" * 31})
    assert Settings.from_env({"TOKENCHAT_JWT_SECRET": SECRET}).jwt_secret == SECRET
    assert Settings().jwt_secret == ""  # unset: `serve` says so itself


def test_insecure_reasons_name_dev_mode_and_fake_payments() -> None:
    assert Settings().insecure_reasons() == []
    reasons = Settings(dev_mode=1, payment_provider="fake").insecure_reasons()
    assert len(reasons) == 2
    assert "TOKENCHAT_DEV_MODE" in reasons[0] and "TOKENCHAT_PAYMENT_PROVIDER" in reasons[1]


@pytest.mark.parametrize(
    "name", ["TOKEN_TTL_MAX_S", "LEDGER_POOL_MAX", "HTTP_CREATES_PER_S", "HTTP_CREATES_BURST"]
)
def test_new_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"TOKENCHAT_{name} must be > 0"):
        Settings.from_env({f"TOKENCHAT_{name}": "0"})


def test_metrics_port_must_be_a_port() -> None:
    with pytest.raises(ValueError, match="TOKENCHAT_METRICS_PORT must be a TCP port"):
        Settings(metrics_port=70000)


@pytest.mark.parametrize("raw", ["2", "-1"])
def test_redis_cluster_is_a_flag(raw: str) -> None:
    with pytest.raises(ValueError, match="TOKENCHAT_REDIS_CLUSTER must be 0 or 1"):
        Settings.from_env({"TOKENCHAT_REDIS_CLUSTER": raw})
    assert Settings.from_env({"TOKENCHAT_REDIS_CLUSTER": "1"}).redis_cluster == 1
    assert Settings().redis_cluster == 0  # a single Redis unless told


def test_room_history_is_bounded_by_count_and_by_age() -> None:
    assert Settings.from_env({"TOKENCHAT_HISTORY_LEN": "10000"}).history_len == 10_000
    for raw in ("10001", "0"):
        with pytest.raises(ValueError, match="TOKENCHAT_HISTORY_LEN"):
            Settings.from_env({"TOKENCHAT_HISTORY_LEN": raw})
    assert Settings.from_env({"TOKENCHAT_HISTORY_AGE_S": "1"}).history_age_s == 1.0
    for raw in ("0", "0.5", "604801", "-1", "nan"):
        with pytest.raises(ValueError, match="TOKENCHAT_HISTORY_AGE_S"):
            Settings.from_env({"TOKENCHAT_HISTORY_AGE_S": raw})
