"""Build the local control plane's binaries from Go modules, once, into a per-version cache.

This machine has no Docker and no way to download prebuilt release binaries, but it does
reach the Go module proxy; so every component (kube-apiserver, etcd, kwok, KubeRay, ...)
is compiled from its module at a pinned version. A cold build takes many minutes on two
cores, so results live OUTSIDE the repository, keyed by version::

    ${GPUMESH_CACHE:-${XDG_CACHE_HOME:-~/.cache}/gpumesh}/toolchain/<name>-<version>/<binary>

and are reused by every checkout, test run and ``make up``. The Go flags match the ones
CI and developers use, so Go's own build cache makes a rebuild (for example after the
toolchain cache was wiped) mostly a link step.

``python -m testbed.toolchain`` builds everything with progress shown; CI runs
it before the tests so a cold build is visible rather than a silent fixture.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from testbed import versions

_KUBE_LDFLAGS: Final = " ".join(
    [
        "-s -w",
        f"-X k8s.io/component-base/version.gitVersion={versions.KUBERNETES}",
        "-X k8s.io/component-base/version.gitMajor=1",
        "-X k8s.io/component-base/version.gitMinor=" + versions.KUBERNETES.split(".")[1],
    ]
)
_PLAIN_LDFLAGS: Final = "-s -w"

_GOMOD_SRC: Final = Path(__file__).resolve().parent / "gomod" / "kube"

KUBERAY_CRD_FILES: Final = (
    "ray.io_rayclusters.yaml",
    "ray.io_rayjobs.yaml",
    "ray.io_rayservices.yaml",
)
"""The CRDs the operator watches by default (RayCronJob is behind an off-by-default gate)."""

KWOK_STAGE_FILES: Final = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
"""The stages kwokctl uses by default; the bare kwok binary has none built in."""


PLAIN_PROGRESS_EVERY_S: Final = 30.0
"""Without a terminal (CI logs, `make up > log`), how often a build says where it stands."""


class ToolchainError(RuntimeError):
    """A binary or asset could not be built or found."""


class GoMissingError(ToolchainError):
    """`go` is not installed, so nothing that is not cached yet can be built."""


@dataclass(frozen=True)
class Binary:
    """How one binary is built: ``go build PACKAGE`` inside a module.

    ``module`` None means the checked-in kube wrapper module (kube binaries and etcd);
    otherwise the binary's own module, built in its directory in Go's module cache. That is
    what ``go install MODULE@VERSION`` does, minus its deprecation lookup in the proxy's
    version list, which the proxy refuses for some modules (KubeRay's: HTTP 403).
    """

    name: str
    component: str
    version: str
    package: str
    ldflags: str
    module: str | None = None

    @property
    def key(self) -> str:
        """Cache directory name: bumping the version gives a fresh directory."""
        return f"{self.component}-{self.version}"


def _kube(name: str) -> Binary:
    return Binary(
        name, "kubernetes", versions.KUBERNETES, f"k8s.io/kubernetes/cmd/{name}", _KUBE_LDFLAGS
    )


BINARIES: Final[Mapping[str, Binary]] = {
    b.name: b
    for b in (
        _kube("kube-apiserver"),
        Binary("etcd", "etcd", versions.ETCD, versions.ETCD_MODULE, _PLAIN_LDFLAGS),
        _kube("kube-controller-manager"),
        _kube("kube-scheduler"),
        _kube("kubectl"),
        Binary("kwok", "kwok", versions.KWOK, "./cmd/kwok", _PLAIN_LDFLAGS, versions.KWOK_MODULE),
        Binary(
            "ray-operator",
            "kuberay",
            versions.KUBERAY,
            ".",
            _PLAIN_LDFLAGS,
            versions.KUBERAY_MODULE,
        ),
        Binary("helm", "helm", versions.HELM, "./cmd/helm", _PLAIN_LDFLAGS, versions.HELM_MODULE),
    )
}

CLUSTER_BINARIES: Final = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "ray-operator",
)
"""What ``LocalCluster`` runs; helm is only needed by the kind path, kubectl by people."""


@dataclass(frozen=True)
class Toolchain:
    """Paths of built binaries and fetched assets, all inside the version-keyed cache."""

    root: Path
    binaries: Mapping[str, Path]
    kuberay_crds: tuple[Path, ...]
    kwok_stages: tuple[Path, ...]

    def path(self, binary: str) -> Path:
        """Path of one built binary; a KeyError names a binary that was not ensured."""
        return self.binaries[binary]


def cache_root() -> Path:
    """``$GPUMESH_CACHE``, else ``$XDG_CACHE_HOME/gpumesh``, else ``~/.cache/gpumesh``."""
    explicit = os.environ.get("GPUMESH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "gpumesh"


def toolchain_root() -> Path:
    """Where binaries and assets live: ``<cache_root>/toolchain``."""
    return cache_root() / "toolchain"


def binary_path(name: str, root: Path | None = None) -> Path:
    """Cache path of a binary, whether or not it is built yet."""
    spec = BINARIES[name]
    return (root or toolchain_root()) / spec.key / spec.name


def _crd_dir(root: Path) -> Path:
    return root / f"kuberay-{versions.KUBERAY}" / "crds"


def _stage_dir(root: Path) -> Path:
    return root / f"kwok-{versions.KWOK}" / "stages"


def _assets(root: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    crds = tuple(_crd_dir(root) / f for f in KUBERAY_CRD_FILES)
    stages = tuple(_stage_dir(root) / Path(f).name for f in KWOK_STAGE_FILES)
    return crds, stages


def go_executable() -> str:
    """Path of ``go``; raises GoMissingError with what to do when it is absent."""
    go = shutil.which("go")
    if go is None:
        raise GoMissingError(
            "`go` was not found on PATH, and the local control plane is built from Go "
            f"modules (Go >= {versions.GO_MIN[0]}.{versions.GO_MIN[1]}). Install Go, or "
            f"point GPUMESH_CACHE at a cache that already holds the toolchain "
            f"(looked in {toolchain_root()})."
        )
    return go


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise builders: two test sessions must not race on the same cache entry."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _kube_module_dir(root: Path) -> Path:
    """A copy of the checked-in wrapper module, so builds never write into the repo."""
    dest = root / f"gomod-kube-{versions.KUBERNETES}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("go.mod", "go.sum"):
        src = (_GOMOD_SRC / name).read_bytes()
        target = dest / name
        if not target.exists() or target.read_bytes() != src:
            target.write_bytes(src)
    return dest


def _run_go(
    args: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    progress: Progress,
    label: str,
) -> None:
    """Run one go command, streaming ``-v`` package names into the progress line."""
    task = progress.add_task(f"{label}: compiling or linking", total=None)
    tail: deque[str] = deque(maxlen=40)
    count = 0
    # Without a terminal the spinner is invisible: say where the build stands now and then.
    plain = not progress.console.is_terminal
    started = last_said = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ " + " ".join(args) + "\n")
        fh.flush()
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            tail.append(line.rstrip())
            if not line.startswith((" ", "\t", "#", "go:")):
                count += 1
                progress.update(task, description=f"{label}: {count} pkgs, {line.strip()[:60]}")
            now = time.monotonic()
            if plain and now - last_said >= PLAIN_PROGRESS_EVERY_S:
                last_said = now
                progress.console.print(f"  {label}: {count} packages, {now - started:.0f}s")
        rc = proc.wait()
    progress.remove_task(task)
    if rc != 0:
        raise ToolchainError(f"{label} failed (exit {rc}); full log: {log}\n" + "\n".join(tail))


def _build_binary(spec: Binary, root: Path, go: str, progress: Progress, console: Console) -> float:
    """Build one binary into its cache slot atomically; returns the seconds it took."""
    started = time.monotonic()
    dest = binary_path(spec.name, root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("GO111MODULE", "on")
    log = root / "logs" / f"{spec.key}-{spec.name}.log"
    label = f"build {spec.name} {spec.version}"
    if spec.module is None:
        cwd = _kube_module_dir(root)
    else:
        cwd = module_dir(spec.module, spec.version, cwd=root)
        env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -mod=readonly -buildvcs=false").strip()
    tmp = dest.with_name(dest.name + ".tmp")
    _run_go(
        [go, "build", "-v", "-trimpath", "-ldflags", spec.ldflags, "-o", str(tmp), spec.package],
        cwd=cwd,
        env=env,
        log=log,
        progress=progress,
        label=label,
    )
    os.replace(tmp, dest)
    took = time.monotonic() - started
    console.print(f"[green]✓[/] built {spec.name} {spec.version} in {took:.0f}s -> {dest}")
    return took


def module_dir(module: str, version: str, *, cwd: Path | None = None) -> Path:
    """Source directory of ``module@version`` in Go's module cache (downloading if needed)."""
    go = go_executable()
    workdir = cwd or toolchain_root()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GO111MODULE="on")
    proc = subprocess.run(
        [go, "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Dir" not in info:
        detail = info.get("Error") or proc.stderr.strip() or proc.stdout.strip()
        raise ToolchainError(f"go mod download {module}@{version} failed: {detail}")
    return Path(info["Dir"])


def _fetch_assets(root: Path, console: Console) -> None:
    """Copy the KubeRay CRDs and kwok stage files out of the Go module cache."""
    crds, stages = _assets(root)
    if not all(p.exists() for p in crds):
        src = module_dir(versions.KUBERAY_MODULE, versions.KUBERAY, cwd=root) / "config/crd/bases"
        _crd_dir(root).mkdir(parents=True, exist_ok=True)
        for name in KUBERAY_CRD_FILES:
            _copy_writable(src / name, _crd_dir(root) / name)
        console.print(f"[green]✓[/] KubeRay {versions.KUBERAY} CRDs -> {_crd_dir(root)}")
    if not all(p.exists() for p in stages):
        src = module_dir(versions.KWOK_MODULE, versions.KWOK, cwd=root)
        _stage_dir(root).mkdir(parents=True, exist_ok=True)
        for rel in KWOK_STAGE_FILES:
            _copy_writable(src / rel, _stage_dir(root) / Path(rel).name)
        console.print(f"[green]✓[/] kwok {versions.KWOK} stages -> {_stage_dir(root)}")


def _copy_writable(src: Path, dest: Path) -> None:
    """Copy without the module cache's read-only mode, so a cache wipe works."""
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dest)


def ensure(
    binaries: Iterable[str] | None = None,
    *,
    console: Console | None = None,
    assets: bool = True,
) -> Toolchain:
    """Return the toolchain, building whatever is missing from the cache first.

    ``binaries`` defaults to everything (helm included). When everything is cached this
    needs no ``go`` at all; otherwise a missing ``go`` raises GoMissingError.
    """
    names = list(BINARIES) if binaries is None else list(binaries)
    unknown = [n for n in names if n not in BINARIES]
    if unknown:
        raise ToolchainError(f"unknown binaries {unknown}; known: {sorted(BINARIES)}")
    root = toolchain_root()
    con = console or Console(stderr=True)
    crds, stages = _assets(root)

    def missing() -> list[str]:
        return [n for n in names if not binary_path(n, root).exists()]

    def assets_missing() -> bool:
        return assets and not all(p.exists() for p in (*crds, *stages))

    if missing() or assets_missing():
        go = go_executable()
        with _locked(root):
            todo = missing()  # another process may have built some while we waited
            if todo:
                con.print(
                    f"[bold]Building {', '.join(todo)}[/] from Go modules into {root} "
                    "(cold: tens of minutes on 2 cores; cached afterwards)"
                )
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=con,
                transient=True,
            ) as progress:
                for name in todo:
                    _build_binary(BINARIES[name], root, go, progress, con)
            if assets_missing():
                _fetch_assets(root, con)
    return Toolchain(
        root=root,
        binaries={n: binary_path(n, root) for n in names},
        kuberay_crds=crds if assets else (),
        kwok_stages=stages if assets else (),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: build everything (or ``--only`` some binaries) and print where it went."""
    parser = argparse.ArgumentParser(prog="python -m testbed.toolchain")
    parser.add_argument("--only", nargs="*", choices=sorted(BINARIES), help="binaries to build")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    started = time.monotonic()
    try:
        tc = ensure(args.only, console=console)
    except ToolchainError as exc:
        console.print(f"[red]toolchain: {exc}[/]")
        return 2
    for name, path in tc.binaries.items():
        console.print(f"{name:<24} {path}")
    console.print(f"toolchain ready in {time.monotonic() - started:.1f}s (cache {tc.root})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
