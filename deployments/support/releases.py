"""How a state dict stands against a released network's tensor names and shapes: what the preprocessors' loaders
(OpenPose, HED and PiDiNet, M-LSD) refuse a file for, and what the converter recognises a release by."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def mismatches(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, object],
               optional: Callable[[str], bool] = lambda _name: False) -> dict[str, list[str]]:
    """How ``state`` differs from ``expected`` (each name's shape): its ``missing`` (but those ``optional`` lets
    go), ``unexpected`` and ``wrong_shape`` names, sorted; an empty dict where it is the release's."""
    missing = sorted(k for k in expected.keys() - state.keys() if not optional(k))
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & state.keys() if tuple(getattr(state[k], "shape", ())) != expected[k])
    return {name: keys for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong_shape", shapes))
            if keys}
