"""Where configuration values come from: the ``--config`` env file, secret files, systemd
credentials and Synapse's AS registration file (docs/configuration.md).

:mod:`rtcauthd.config` says *which* settings exist and in what order they are read; this
module reads the files behind them, with upstream's precedence and error texts.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Optional

CREDENTIAL_KEY = "livekit_key"
CREDENTIAL_SECRET = "livekit_secret"
CREDENTIAL_AS_TOKEN = "livekit_as_token"
CREDENTIAL_HS_TOKEN = "livekit_hs_token"
REGISTRATION_ERROR = "Could not parse app service registration file: "


class ConfigError(Exception):
    """A start-up configuration problem; ``str()`` is the single line to print."""


def _trim_secret(value: str) -> str:
    """Upstream trims spaces, CR and LF only (tabs survive), whatever the source."""
    return value.strip(" \r\n")


def read_text_file(path: str) -> str:
    """File content as os.environ holds values: undecodable bytes kept as surrogates, so a
    secret that is not UTF-8 still signs with its exact bytes (``encode(..., "surrogateescape")``)."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="surrogateescape")


def _env_file_value(raw: str) -> str:
    """A value as systemd's EnvironmentFile= reads it, so ``--config`` and the unit agree.

    Unquoted: ``\\x`` is ``x``, trailing blanks dropped. ``'…'``: literal. ``"…"``: only
    ``\\"``, ``\\\\``, ``\\$`` and ``\\``` lose their backslash. Pieces concatenate.
    """
    out: list[str] = []
    i, n = 0, len(raw)
    trailing_blanks = 0
    while i < n:
        ch = raw[i]
        if ch == "'":
            end = raw.find("'", i + 1)
            end = n if end < 0 else end
            out.append(raw[i + 1 : end])
            i, trailing_blanks = end + 1, 0
        elif ch == '"':
            i += 1
            while i < n and raw[i] != '"':
                if raw[i] == "\\" and i + 1 < n and raw[i + 1] in '"\\`$':
                    i += 1
                out.append(raw[i])
                i += 1
            i, trailing_blanks = i + 1, 0
        elif ch == "\\" and i + 1 < n:
            out.append(raw[i + 1])
            i, trailing_blanks = i + 2, 0
        else:
            out.append(ch)
            trailing_blanks = trailing_blanks + 1 if ch in " \t" else 0
            i += 1
    value = "".join(out)
    return value[: len(value) - trailing_blanks] if trailing_blanks else value


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=value`` lines with systemd EnvironmentFile= rules (comments, quotes, escapes)."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"--config: line {lineno} is not KEY=value")
        result[name] = _env_file_value(value.lstrip(" \t"))
    return result


def read_credential(env: Mapping[str, str], read_file: Callable[[str], str], name: str) -> Optional[str]:
    """systemd credential ``name`` from ``$CREDENTIALS_DIRECTORY``; None when there is none."""
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    if not credentials:
        return None
    try:
        return read_file(os.path.join(credentials, name))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"CREDENTIALS_DIRECTORY: cannot read credential {name}: {e.strerror or e}") from None


def read_source(variable: str, path: str, read_file: Callable[[str], str]) -> str:
    """``path``'s content; a read error is the one-line ConfigError naming ``variable``."""
    try:
        return read_file(path)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{variable}: cannot read {path}: {reason}") from None


def key_and_secret(
    env: Mapping[str, str], read_file: Callable[[str], str], warnings: list[str]
) -> tuple[str, str, str, str]:
    """Key/secret sources in upstream's precedence (docs/configuration.md#key-and-secret), plus systemd credentials."""
    key, secret = env.get("LIVEKIT_KEY", ""), env.get("LIVEKIT_SECRET", "")
    key_source = "LIVEKIT_KEY" if key else ""
    secret_source = "LIVEKIT_SECRET" if secret else ""
    key_file = env.get("LIVEKIT_KEY_FILE", "")
    if key_file:
        ignored = [
            n
            for n in ("LIVEKIT_KEY", "LIVEKIT_SECRET", "LIVEKIT_KEY_FROM_FILE", "LIVEKIT_SECRET_FROM_FILE")
            if env.get(n)
        ]
        if ignored:
            warnings.append(f"LIVEKIT_KEY_FILE is set, so {', '.join(ignored)} is ignored")
        parts = read_source("LIVEKIT_KEY_FILE", key_file, read_file).split(":")
        if len(parts) != 2:
            raise ConfigError("LIVEKIT_KEY_FILE: invalid key secret file format!")
        key, secret = parts
        key_source = secret_source = f"LIVEKIT_KEY_FILE ({key_file})"
    else:
        for variable, is_key in (("LIVEKIT_KEY_FROM_FILE", True), ("LIVEKIT_SECRET_FROM_FILE", False)):
            path = env.get(variable, "")
            if not path:
                continue
            value = read_source(variable, path, read_file)
            plain = "LIVEKIT_KEY" if is_key else "LIVEKIT_SECRET"
            if env.get(plain):
                warnings.append(f"{variable} is set, so {plain} is ignored")
            if is_key:
                key, key_source = value, f"{variable} ({path})"
            else:
                secret, secret_source = value, f"{variable} ({path})"
    for name, is_key in ((CREDENTIAL_KEY, True), (CREDENTIAL_SECRET, False)):
        if key if is_key else secret:
            continue
        value = read_credential(env, read_file, name)
        if value is None:
            continue
        if is_key:
            key, key_source = value, f"systemd credential {name}"
        else:
            secret, secret_source = value, f"systemd credential {name}"
    return _trim_secret(key), _trim_secret(secret), key_source, secret_source


def _yaml_error_text(error: Exception) -> str:
    """PyYAML's message on one line, without the snippet of the file it quotes (a token)."""
    import yaml

    if isinstance(error, yaml.MarkedYAMLError):
        parts = []
        for text, mark in ((error.context, error.context_mark), (error.problem, error.problem_mark)):
            if text:
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
                parts.append(text + where)
        return ": ".join(parts) or type(error).__name__
    if isinstance(error, yaml.reader.ReaderError):
        return f"unacceptable character #x{error.character:04x}: {error.reason} (position {error.position})"
    return " ".join(str(error).split())


def read_registration(text: str) -> tuple[str, str]:
    """as_token and hs_token of a Synapse AS registration (docs/configuration.md#application-service-mode)."""
    import yaml

    try:
        root = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(REGISTRATION_ERROR + _yaml_error_text(e)) from None
    if not isinstance(root, dict):
        raise ConfigError(REGISTRATION_ERROR + "invalid root element")
    tokens = []
    for key in ("as_token", "hs_token"):
        if key not in root:
            raise ConfigError(f"{REGISTRATION_ERROR}no {key} property")
        value = root[key]
        # an unquoted 12345 or yes is no string for upstream's YAML library either
        if not isinstance(value, str):
            raise ConfigError(f"{REGISTRATION_ERROR}invalid value for {key} property")
        tokens.append(value.strip())
    return tokens[0], tokens[1]


def read_token(
    env: Mapping[str, str], read_file: Callable[[str], str], warnings: list[str], variable: str, credential: str
) -> str:
    """One token: ``<variable>_FROM_FILE`` over ``<variable>``; a systemd credential fills in."""
    from_file = variable + "_FROM_FILE"
    value = env.get(variable, "")
    path = env.get(from_file, "")
    if path:
        value = read_source(from_file, path, read_file)
        if env.get(variable):
            warnings.append(f"{from_file} is set, so {variable} is ignored")
    if not value.strip():
        value = read_credential(env, read_file, credential) or value
    return value.strip()
