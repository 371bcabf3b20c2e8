"""Helpers shared by the config files (ml_collections only; configs never import fer_jax).

`parse_arg('runlocal,data=ckplus48', runlocal=False, data='synthetic')` turns the text after
the colon of `--config=configs/x.py:ARGS` into a ConfigDict of typed values (big_vision style):
a bare word sets a boolean to True, `k=v` sets a value converted to the default's type.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    result = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
        if not _:  # A bare word is a switch.
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value: {key}=...")
            result[key] = True
            continue
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            result[key] = value.lower() in ("true", "1")
        else:
            try:
                result[key] = kind(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}={value!r} is not a {kind.__name__}") from e
    return result
