"""Which base checkpoint a request runs on, decided in the ingress before any work starts.

Every API family names a checkpoint its own way (``model`` in seeds 000, 002 and 003, where seed 002's
``photorealistic`` / ``anime`` are aliases from the config; ``override_settings.sd_model_checkpoint`` in A1111);
one that names none gets the service's default: the one A1111's ``POST /sdapi/v1/options`` last set (kept in the
job store, so every ingress replica agrees), else the config's. The name is resolved here, once, and travels with
the request (a queued job keeps it), so a default changed meanwhile never moves a request already accepted. An
unknown name is a 422 naming the field and listing the choices.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from deployments.support.checkpoints import Catalog
from deployments.support.errors import UnknownModel
from graphs import plans
from graphs.api.errors import call
from graphs.jobs.store import JobStore

if TYPE_CHECKING:
    from graphs.app import AppArgs

logger = logging.getLogger(__name__)

OPTION = "sd_model_checkpoint"  # A1111's name for the default checkpoint, as the job store keeps it


class CheckpointChoice:
    catalog: Catalog
    config: AppArgs
    jobs: JobStore
    handles: plans.Handles

    async def checkpoint(self, wanted: str | None, field: str) -> str:
        """The checkpoint a request runs on: ``wanted`` resolved (an alias or an A1111 title is accepted), or
        the default."""
        return await asyncio.to_thread(self._resolve, wanted, field)

    def _resolve(self, wanted: str | None, field: str) -> str:
        if not wanted:
            return self._default()
        try:
            return self.catalog.resolve(wanted, field)
        except UnknownModel as e:
            refiner = self.config.refiner
            if refiner is not None and wanted.partition(" [")[0].strip() == refiner.name:
                # /sd-models lists it, as A1111 lists every checkpoint: its place is refiner_checkpoint.
                raise UnknownModel(f"{refiner.name!r} is the refiner, not a base checkpoint: name it in "
                                   "refiner_checkpoint", field=field, details=e.details) from e
            raise

    async def default_checkpoint(self) -> str:
        return await asyncio.to_thread(self._default)

    def _default(self) -> str:
        saved = self.jobs.options().get(OPTION)
        if saved:
            try:
                return self.catalog.resolve(saved, OPTION)
            except UnknownModel:  # its file was removed from checkpoint_dir since
                logger.warning("default checkpoint %r is gone; the configured default is used", saved)
        return self.catalog.default

    async def set_default_checkpoint(self, wanted: str, field: str) -> str:
        name = await self.checkpoint(wanted, field)
        await asyncio.to_thread(self.jobs.set_option, OPTION, name)
        return name

    async def holdings(self) -> dict[str, dict]:
        """What each base replica holds, by replica id, as the replicas last told the progress board."""
        if self.handles.board is None:
            return {}
        return await call(self.handles.board.held.remote())
