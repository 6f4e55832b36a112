"""Check a SavedModel with TensorFlow's C++ loader, the one TF Serving uses.

The checker (``export/native/savedmodel_check.cc``) is a small C++ program
built against the installed TensorFlow wheel. It loads a version directory with
``tensorflow::LoadSavedModel`` (tag ``serve``), replays the TF Serving warmup
requests in ``assets.extra/tf_serving_warmup_requests`` through
``Session::Run`` by SignatureDef, and prints one JSON line per request. No
Python runs inside it, so a graph with ``tf.py_function`` fails exactly as it
would in TF Serving (FAILED_PRECONDITION).

Usage::

    from export.native_loader import check_saved_model
    results = check_saved_model("models/retrieval/1")   # list of dicts
    results[0]["outputs"]["scores"]["shape"]              # e.g. [2, 10]

or ``python -m export.native_loader MODEL_VERSION_DIR``.

Build recipe (checked on these machines, ../shared/GUIDE.md section 1): headers
from ``tf.sysconfig.get_include()``; ``-std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1
-DEIGEN_MAX_ALIGN_BYTES=64``; link with ``-Wl,--no-as-needed``
``python/lib_pywrap_tensorflow_common.so`` (it holds the DirectSession
registration), ``libtensorflow_cc.so.2``, ``libtensorflow_framework.so.2`` and
libpython (``python3-config --ldflags --embed``), with rpaths to their folders.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "NativeLoadError",
    "SOURCE",
    "build_checker",
    "check_saved_model",
    "compiler_available",
    "scann_ops_library",
]

SOURCE = Path(__file__).resolve().parent / "native" / "savedmodel_check.cc"
_BINARY_NAME = "savedmodel_check"
_CXX_FLAGS = ["-std=c++17", "-O1", "-D_GLIBCXX_USE_CXX11_ABI=1", "-DEIGEN_MAX_ALIGN_BYTES=64"]


class NativeLoadError(RuntimeError):
    """The C++ checker failed to build, load a SavedModel or run its warmup requests.

    ``returncode`` is the checker's exit code (None for build failures) and
    ``stderr`` its error output; the message holds the checker's ERROR line(s).
    """

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _compiler() -> str | None:
    """The C++ compiler to use: $CXX if set and found, else g++ or c++."""
    candidates = [os.environ.get("CXX"), "g++", "c++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compiler_available() -> bool:
    """True when a C++ compiler is on PATH (the checker can be built)."""
    return _compiler() is not None


def _tf_paths() -> tuple[str, Path, str]:
    """(tensorflow version, wheel directory, include directory), without importing tensorflow.

    Importing tensorflow costs seconds; its paths can be found from the
    package spec and its version from the distribution metadata.
    """
    from importlib import metadata

    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise NativeLoadError("tensorflow is not installed")
    lib_dir = Path(list(spec.submodule_search_locations)[0])
    try:
        version = metadata.version("tensorflow")
    except metadata.PackageNotFoundError:  # pragma: no cover - odd installs
        version = "unknown"
    return version, lib_dir, str(lib_dir / "include")


def _python_link_flags() -> list[str]:
    """Linker flags for this interpreter's libpython.

    Uses the ``python3-config --ldflags --embed`` that sits next to the running
    interpreter (a python3-config found on PATH may belong to another Python),
    else the same information from sysconfig.
    """
    version = sysconfig.get_python_version()
    for exe in (getattr(sys, "_base_executable", None), sys.executable):
        if not exe:
            continue
        bindir = Path(os.path.realpath(exe)).parent
        for name in (f"python{version}-config", "python3-config"):
            config = bindir / name
            if not config.exists():
                continue
            out = subprocess.run(
                [str(config), "--ldflags", "--embed"], capture_output=True, text=True, check=False
            )
            if out.returncode == 0 and out.stdout.strip():
                return shlex.split(out.stdout)
    libdir = sysconfig.get_config_var("LIBDIR")
    ldversion = sysconfig.get_config_var("LDVERSION") or version
    return [f"-L{libdir}", f"-lpython{ldversion}", f"-Wl,-rpath,{libdir}", "-ldl", "-lm"]


CACHE_ENV = "TWOTOWER_CACHE_DIR"


def _default_cache_dir() -> Path:
    """``$TWOTOWER_CACHE_DIR`` (the test suite points it at one directory per
    run), else ``$XDG_CACHE_HOME/twotower`` or ``~/.cache/twotower``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "twotower"


def _compile_command(compiler: str, output: Path) -> list[str]:
    _, lib_dir, include = _tf_paths()
    pywrap_dir = lib_dir / "python"
    libs = [
        pywrap_dir / "lib_pywrap_tensorflow_common.so",
        lib_dir / "libtensorflow_cc.so.2",
        lib_dir / "libtensorflow_framework.so.2",
    ]
    missing = [str(p) for p in libs if not p.exists()]
    if missing:
        raise NativeLoadError(f"TensorFlow libraries not found: {', '.join(missing)}")
    return [
        compiler,
        *_CXX_FLAGS,
        f"-I{include}",
        str(SOURCE),
        "-o",
        str(output),
        "-Wl,--no-as-needed",
        *[str(p) for p in libs],
        *_python_link_flags(),
        f"-Wl,-rpath,{lib_dir}",
        f"-Wl,-rpath,{pywrap_dir}",
    ]


def build_checker(cache_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Compile the checker once and return the binary's path.

    The binary is cached in ``cache_dir`` (default ``$TWOTOWER_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/twotower`` or ``~/.cache/twotower``) under a name
    keyed by a hash of the source, the TensorFlow version and the compile/link
    flags, so a changed source or a new TensorFlow rebuilds it. Compiling takes
    about 20 s on 2 cores.
    Raises NativeLoadError when no compiler exists or compilation fails.
    """
    compiler = _compiler()
    if compiler is None:
        raise NativeLoadError("no C++ compiler found (install g++ or set $CXX)")
    tf_version, lib_dir, _ = _tf_paths()
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(tf_version.encode())
    key.update(str(lib_dir).encode())
    key.update(" ".join(_CXX_FLAGS + _python_link_flags()).encode())
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    binary = cache / f"{_BINARY_NAME}-{key.hexdigest()[:16]}"
    if binary.exists() and not force:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name, then rename: concurrent builds never see a
    # half-written binary.
    fd, tmp = tempfile.mkstemp(prefix=f".{_BINARY_NAME}-", dir=cache)
    os.close(fd)
    try:
        cmd = _compile_command(compiler, Path(tmp))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NativeLoadError(
                "compiling the SavedModel checker failed:\n"
                + shlex.join(cmd)
                + "\n"
                + proc.stderr[-8000:],
                returncode=proc.returncode,
                stderr=proc.stderr,
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


def scann_ops_library() -> Path | None:
    """Path of ScaNN's TF op library (``scann/scann_ops/cc/_scann_ops.so``), or None.

    Found without importing scann (which would import tensorflow).
    """
    spec = importlib.util.find_spec("scann")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "scann_ops" / "cc" / "_scann_ops.so"
        if path.exists():
            return path
    return None


def check_saved_model(
    version_dir: str | os.PathLike,
    load_scann_ops: bool = True,
    timeout: float = 120,
    *,
    max_values: int = 16,
    require_warmup: bool = True,
    op_libraries: list[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Load ``version_dir`` with the C++ SavedModel loader and replay its warmup requests.

    Returns one dict per warmup request, in file order::

        {"index": 0, "model": "retrieval", "signature": "serving_default",
         "outputs": {"scores": {"name": "StatefulPartitionedCall:1",
                                "dtype": "float32", "shape": [2, 10],
                                "values": [...first max_values...], "truncated": True}}}

    ``load_scann_ops`` loads ScaNN's op library first (when scann is
    installed); ``op_libraries`` adds others. With ``require_warmup=False`` a
    directory without a warmup file only has to load (returns ``[]``).
    Raises NativeLoadError (with the checker's stderr) on any failure,
    including a timeout.
    """
    version_dir = Path(version_dir)
    if not (version_dir / "saved_model.pb").exists() and not (
        version_dir / "saved_model.pbtxt"
    ).exists():
        raise NativeLoadError(f"{version_dir} is not a SavedModel directory (no saved_model.pb)")
    binary = build_checker(cache_dir)
    cmd = [str(binary)]
    libraries = [Path(p) for p in (op_libraries or [])]
    if load_scann_ops:
        scann_lib = scann_ops_library()
        if scann_lib is not None:
            libraries.insert(0, scann_lib)
    cmd += [f"--op_library={p}" for p in libraries]
    cmd += [f"--max_values={int(max_values)}"]
    if not require_warmup:
        cmd.append("--allow_missing_warmup")
    cmd.append(str(version_dir))

    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as e:
        stderr = (e.stderr or b"").decode("utf-8", "replace")
        raise NativeLoadError(
            f"native check of {version_dir} timed out after {timeout} s", stderr=stderr
        ) from None
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("ERROR: ")]
        if errors:
            detail = "\n".join(line[len("ERROR: "):] for line in errors)
        elif proc.returncode < 0:
            detail = f"killed by signal {-proc.returncode}\n{stderr[-4000:]}"
        else:
            detail = stderr[-4000:]
        raise NativeLoadError(
            f"native check of {version_dir} failed (exit {proc.returncode}): {detail}",
            returncode=proc.returncode,
            stderr=stderr,
        )
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command line: check SavedModel version directories, print their JSON lines."""
    parser = argparse.ArgumentParser(
        prog="python -m export.native_loader",
        description=(
            "Load SavedModel version directories with TensorFlow's C++ loader "
            "(as TF Serving does) and replay their warmup requests."
        ),
    )
    parser.add_argument("version_dirs", nargs="+", metavar="DIR", help="SavedModel version directory")
    parser.add_argument("--no-scann-ops", action="store_true", help="do not load ScaNN's op library")
    parser.add_argument(
        "--op-library", action="append", default=[], metavar="SO", help="extra op library to load"
    )
    parser.add_argument("--max-values", type=int, default=16, help="values printed per output")
    parser.add_argument(
        "--allow-missing-warmup", action="store_true", help="only load when there is no warmup file"
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds per model")
    parser.add_argument("--cache-dir", default=None, help="where the compiled checker is kept")
    args = parser.parse_args(argv)
    status = 0
    for d in args.version_dirs:
        try:
            results = check_saved_model(
                d,
                load_scann_ops=not args.no_scann_ops,
                timeout=args.timeout,
                max_values=args.max_values,
                require_warmup=not args.allow_missing_warmup,
                op_libraries=args.op_library,
                cache_dir=args.cache_dir,
            )
        except NativeLoadError as e:
            print(f"{d}: FAILED: {e}", file=sys.stderr)
            status = 1
            continue
        for r in results:
            print(json.dumps({"dir": str(d), **r}))
        print(f"{d}: OK ({len(results)} warmup requests)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
