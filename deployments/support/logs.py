"""The service's own log lines in Serve's replica logs.

Every module logs through ``logging.getLogger(__name__)``, under the ``deployments`` and ``graphs`` packages. In
a replica, Serve configures only its ``ray.serve`` logger (which does not propagate) and leaves the root logger at
WARNING with no handler: without ``replica_logging`` every INFO line of ours is dropped, and a WARNING reaches only
the worker's raw stderr, with no time, level, replica or request id.

``replica_logging`` (the first call of every deployment's ``__init__``) hands the records of both packages to the
handlers Serve gives ``ray.serve``, as they are at each record: Serve's filters add the replica and the request
id, its formatter (text or JSON, ``logging_config.encoding``) and its rotating ``/serve/replica_*.log`` file apply,
and a redeploy whose ``logging_config`` replaces those handlers is followed.
"""

from __future__ import annotations

import logging

PACKAGES = ("deployments", "graphs")
SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME


class ToServe(logging.Handler):
    """Passes each record to the ``ray.serve`` logger's handlers of the moment (never a copy of them: Serve
    replaces its handlers when ``logging_config`` changes). Serve's own level applies too, so that
    ``logging_config.log_level: WARNING`` quiets these lines as it quiets Serve's."""

    def emit(self, record: logging.LogRecord) -> None:
        serve_logger = logging.getLogger(SERVE_LOGGER)
        if not serve_logger.isEnabledFor(record.levelno):
            return
        for handler in list(serve_logger.handlers):
            if record.levelno >= handler.level:
                handler.handle(record)


def in_replica() -> bool:
    """Whether this process is a Serve replica (Serve's local testing mode runs deployments in the caller's
    process, whose logging belongs to the caller: pytest's log capture, a CLI's handlers)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def replica_logging(level: int = logging.INFO) -> None:
    """Route the service's package loggers into Serve's replica logs at ``level``; a no-op outside a replica,
    and idempotent (a deployment's ``__init__`` may run again in the same process)."""
    if not in_replica():
        return
    for name in PACKAGES:
        package = logging.getLogger(name)
        package.setLevel(level)
        package.propagate = False  # the root logger has no handler in a replica, but one added later would double
        if not any(isinstance(handler, ToServe) for handler in package.handlers):
            package.addHandler(ToServe())
