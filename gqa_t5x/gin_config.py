"""Gin plumbing shared by every entry point: flags, search paths, parsing, checks.

Gin files are layered as in T5X: model gin (sizes, `gin/models/...`) -> run gin
(`gin/runs/...`) -> experiment gin (`configs/...`) -> command-line bindings
(`--gin.NUM_KV_HEADS=8`). Names and includes are written relative to the
folder holding `gin/` and `configs/` (`include 'gin/models/t5_1_1/common.gin'`),
`resource_root()`: inside the installed package (`gqa_t5x/gin`, as T5X ships
its gins), or the source checkout the package is imported from (editable
install, PYTHONPATH). It is always the last gin search path, so a file is found
as given (absolute, or relative to the working directory), then on
`--gin_search_paths`, then in the package, from any working directory.

Two checks T5X does not make, because a silently ignored flag costs a pod-day:
a command-line binding of a macro that no parsed gin file defines or uses
(`--gin.CHECKPOINT_PERIODD=1`) is an error naming the closest known macro, and
a macro left at `%gin.REQUIRED` is an error naming it.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.resources
import logging
import re
import tokenize
from collections.abc import Sequence
from pathlib import Path

import gin

from gqa_t5x.errors import UsageError
from gqa_t5x.model import network

# The folders of gin files; setup.py installs them as gqa_t5x/gin, gqa_t5x/configs.
GIN_FOLDERS = ("gin", "configs")

_REQUIRED = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*%gin\.REQUIRED\s*$", re.M)
_MACRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)")


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates T5X-style `--gin.MACRO=value` flags from the other arguments.

    Args:
      argv: Command-line arguments; `--gin.X=v` and `--gin.X v` are accepted.

    Returns:
      (other arguments, bindings such as 'NUM_KV_HEADS=8'), in order.
    """
    rest: list[str] = []
    bindings: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin.") and arg != "--gin.":
            binding = arg[len("--gin."):]
            if "=" not in binding:
                if i + 1 >= len(args):
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE.")
                binding, i = f"{binding}={args[i + 1]}", i + 1
            bindings.append(binding)
        else:
            rest.append(arg)
        i += 1
    return rest, bindings


def source_checkout() -> Path | None:
    """The source checkout `gqa_t5x` is imported from, or None when installed.

    A checkout (editable install, PYTHONPATH) is the package folder's parent
    holding setup.py, `gin/` and `configs/`; an installed package's parent is
    site-packages (which holds gin-config's own `gin/`, hence setup.py).
    """
    package = importlib.resources.files("gqa_t5x")
    if not isinstance(package, Path):
        return None
    root = package.resolve().parent
    if (root / "setup.py").is_file() and all((root / name).is_dir() for name in GIN_FOLDERS):
        return root
    return None


@functools.cache
def resource_root() -> Path:
    """The folder holding the `gin/` and `configs/` of the imported `gqa_t5x`.

    The installed package's own folder when it ships them (a wheel or
    `pip install .`: `gqa_t5x/gin`, `gqa_t5x/configs`), else the source
    checkout it is imported from (`pip install -e .`, PYTHONPATH).

    Raises:
      FileNotFoundError: neither holds them (e.g. a zipped install).
    """
    package = importlib.resources.files("gqa_t5x")
    if isinstance(package, Path) and all((package / name).is_dir() for name in GIN_FOLDERS):
        return package.resolve()
    checkout = source_checkout()
    if checkout is not None:
        return checkout
    raise FileNotFoundError(
        f"The gin files of gqa_t5x ({' and '.join(f'{n}/' for n in GIN_FOLDERS)}) are neither in the installed "
        f"package ({package}) nor in a source checkout beside it; reinstall it (pip install .)."
    )


def default_search_paths() -> list[str]:
    """The package's gin resources (`resource_root()`), so `gin/...` names resolve anywhere."""
    return [str(resource_root())]


def resolve_gin_file(name: str, search_paths: Sequence[str] = ()) -> str:
    """The absolute path of gin file `name`, looked up like T5X does.

    Args:
      name: A path, absolute or relative to the cwd or a search path, such as
        `gin/runs/uptrain.gin` (found in the package from any cwd).
      search_paths: Extra search paths (`--gin_search_paths`), searched before
        the package's `resource_root()`.

    Returns:
      The absolute path (absolute paths keep gin from logging failed lookups).

    Raises:
      FileNotFoundError: no such file anywhere on the search paths.
    """
    bases = [*search_paths, *default_search_paths()]
    for base in ["", *bases]:
        candidate = Path(base) / name
        if candidate.is_file():
            return str(candidate.resolve())
    raise FileNotFoundError(
        f"Gin file {name!r} not found in the working directory or the gin search "
        f"paths {bases}; pass --gin_search_paths or an absolute path."
    )


def _defined_macros(config_str: str) -> set[str]:
    """Macros a parsed configuration defines or refers to."""
    names = set(_MACRO_REFERENCE.findall(config_str)) - {"gin"}  # %gin.REQUIRED
    section = config_str.split("# Macros:", 1)
    if len(section) == 2:
        for line in section[1].split("# Parameters for", 1)[0].splitlines():
            head = line.split("=", 1)[0].strip()
            if "=" in line and _MACRO_NAME.fullmatch(head):
                names.add(head)
    return names


def check_macro_bindings(bindings: Sequence[str], known: set[str]) -> None:
    """Raises UsageError for a binding of a macro no gin file defines or uses.

    Args:
      bindings: 'NAME=value' bindings from the command line.
      known: Macros the parsed gin files define or refer to.
    """
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if not _MACRO_NAME.fullmatch(name) or name in known:
            continue  # A configurable's parameter (`a.b = v`): gin checks those.
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean --gin.{close[0]}?" if close else (
            f"known macros: {', '.join(sorted(known))}.")
        raise UsageError(
            f"--gin.{name} is not a macro of the parsed gin files (it would be "
            f"ignored); {hint}"
        )


def _is_unquoted_string(value: str) -> bool:
    """True for a value gin cannot parse that reads as text meant as a string (runs/x, /tmp/x, gs://b)."""
    value = value.strip()
    if not value or value[0] in "'\"%@[{(" or value in ("True", "False", "None"):
        return False
    try:
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return True
    return False


def describe_binding_error(bindings: Sequence[str], error: Exception) -> str:
    """What a command-line binding gin could not parse needs to change.

    Finds the binding by parsing the bindings one at a time (so the parsed
    configuration is left incomplete: the caller raises).

    Args:
      bindings: The bindings given to gin ('NAME=value', the `--gin.` prefix
        stripped).
      error: What gin raised for all of them together.

    Returns:
      The message: the flag as given and, for an unquoted string, the
      quoting rule with the corrected flag.
    """
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (SyntaxError, tokenize.TokenError) as e:
            error = e
            break
    else:
        return f"Gin bindings do not parse: {error}"
    if "=" not in binding:
        return f"--gin.{binding} is not a binding: write --gin.NAME=VALUE."
    name, value = (part.strip() for part in binding.split("=", 1))
    flag = f"--gin.{name}={value}"
    if _is_unquoted_string(value):
        return (
            f"{flag}: a gin value that is a string must be quoted: --gin.{name}=\\\"{value}\\\" "
            f"(or --gin.{name}=\"'{value}'\"), as the shell removes one level of quotes."
        )
    message = error.msg if isinstance(error, SyntaxError) else error.args[0]
    reason = str(message).strip().splitlines()[-1].strip()
    return (f"{flag} is not a gin value ({reason}); gin takes numbers, True/False/None, quoted strings, "
            "lists, tuples, dicts, %MACRO and @configurable() references.")


def required_macros_missing(config_str: str) -> list[str]:
    """Macros whose value is still `%gin.REQUIRED` in a gin config string."""
    return sorted(set(_REQUIRED.findall(config_str)))


def parse_gin(
    gin_files: Sequence[str] = (),
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    *,
    check_required: bool = True,
) -> str:
    """Parses gin files, then bindings, the way T5X's launcher does, plus checks.

    Args:
      gin_files: Gin files, searched for in `search_paths` + the defaults.
      gin_bindings: Bindings such as `NUM_KV_HEADS=8` (the `--gin.` prefix of
        the command line already stripped).
      search_paths: Extra gin search paths (`--gin_search_paths`).
      check_required: Raise when a macro is left at `%gin.REQUIRED`.

    The configuration is not finalized (locked): a module imported later may
    still declare configurables, and the next `parse_gin` starts afresh.

    Returns:
      The parsed configuration (`gin.config_str()`).

    Raises:
      FileNotFoundError: a gin file is missing.
      UsageError: a binding names an unknown macro, a binding or file does not
        parse, or (with `check_required`) a required macro is not set.
    """
    gin.clear_config()
    for path in [*search_paths, *default_search_paths()]:
        gin.add_config_file_search_path(path)
    resolved = [resolve_gin_file(name, search_paths) for name in gin_files]
    # gin's package-resource reader logs "Path not found" at ERROR level for
    # every include it then finds on a search path; those lines are noise.
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_gin_path_noise)
    try:
        try:
            gin.parse_config_files_and_bindings(resolved, [], finalize_config=False)
        except (SyntaxError, tokenize.TokenError) as e:
            raise UsageError(f"Gin configuration does not parse: {e}") from e
        check_macro_bindings(gin_bindings, _defined_macros(gin.config_str()))
        try:
            gin.parse_config_files_and_bindings([], list(gin_bindings), finalize_config=False)
        except (SyntaxError, tokenize.TokenError) as e:
            raise UsageError(describe_binding_error(gin_bindings, e)) from e
        config_str = gin.config_str()
        missing = required_macros_missing(config_str) if check_required else []
        if missing:
            raise UsageError(
                f"Required gin macro(s) not set: {', '.join(missing)}; pass e.g. "
                f"--gin.{missing[0]}=... (strings in escaped quotes: "
                f"--gin.{missing[0]}=\\\"/path\\\")."
            )
    finally:
        root_logger.removeFilter(_drop_gin_path_noise)
    return config_str


def _drop_gin_path_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


def macro_value(name: str) -> object:
    """The value of a parsed gin macro, or None when it is not bound."""
    try:
        return gin.query_parameter(f"{name}/gin.macro.value")
    except ValueError:
        return None


def model_config() -> network.T5Config:
    """The `network.T5Config` bound by the parsed gin files."""
    return gin.get_configurable(network.T5Config)()


def model_config_from_gin(
    gin_file: str, gin_bindings: Sequence[str] = ()
) -> network.T5Config:
    """Parses `gin_file` (+ bindings) and returns the model config it binds."""
    parse_gin([gin_file], gin_bindings, check_required=False)
    return model_config()
