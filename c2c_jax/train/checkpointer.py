"""Training checkpoints (Orbax): fuser parameters, optimizer state, step, data position. Never the LLMs."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from c2c_jax.c2c.fuser import FuserCheckpointError

log = logging.getLogger(__name__)


class TrainCheckpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager`, so an Orbax API change touches one place."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """state: a TrainState (step, params, opt_state); meta: JSON-serialisable (data position, ...)."""
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, template, step: int | None = None):
        """Restores into the structure, dtypes and shardings of `template` (a TrainState)."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (template.params, template.opt_state))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract[0]), opt_state=ocp.args.StandardRestore(abstract[1]),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
            raise FuserCheckpointError(
                f"cannot restore training checkpoint {self.directory / str(step)} ({type(e).__name__}: "
                f"{_first_line(e)}); it is damaged or was written by a run with another fuser/optimizer config"
            ) from e
        state = dataclasses.replace(template, step=jnp.asarray(step, jnp.int32), params=restored.params,
                                    opt_state=restored.opt_state)
        return state, restored.meta

    def restore_newest_intact(self, template):
        """(state, meta, skipped steps) from the newest checkpoint that restores, or None if there is none.

        A damaged checkpoint (a half-written or truncated file, say) is moved to `damaged/<step>` beside
        the others, never deleted, so the run resumes from the one before it and can save that step again.
        Raises FuserCheckpointError when checkpoints exist and none of them restores.
        """
        skipped, errors = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self.restore(template, step)
            except FuserCheckpointError as e:
                errors.append(str(e))
                log.warning("%s; moving it to %s and trying the one before", e, self.directory / "damaged" / str(step))
                if jax.process_index() == 0:  # one process moves it; every process skips it
                    (self.directory / "damaged").mkdir(exist_ok=True)
                    os.replace(self.directory / str(step), _unused(self.directory / "damaged" / str(step)))
                self.manager.reload()
                skipped.append(step)
                continue
            return state, meta, skipped
        if errors:
            raise FuserCheckpointError(
                f"no training checkpoint under {self.directory} restores (moved to {self.directory / 'damaged'}); "
                f"the newest said: {errors[0]}. Use another --workdir, or move the damaged ones back to retry.")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 160 else line[:160] + "..."


def _unused(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
