"""Checkpoints: a model's arrays through orbax-checkpoint, everything else as JSON.

A checkpoint is a directory of two items: ``arrays`` (parameters, layer state, updater
state and the RNG, as named leaves) and ``meta`` (configuration, counters, the data
iterator's position). ``save``/``restore`` live here; the CheckpointListener, which keeps a
rotating set written asynchronously, in :mod:`jaxws.nn.checkpoint_listener`.
"""

from __future__ import annotations

import datetime
import glob
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxws.arrays import allow_reads
from jaxws.errors import CheckpointError, ConfigurationError
from jaxws.interrupts import guarded

__all__ = ["save_model", "restore_model", "read_meta"]

FORMAT = "jaxws.checkpoint"
ITEMS = ("arrays", "meta")  # the items of a checkpoint


def orbax_checkpoint():
    """orbax.checkpoint, imported at its first use (it is not light), with its logging quietened."""
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax narrates every save at INFO
    return ocp


def checked_path(path: Any, where: str) -> Path:
    """``path`` as an absolute Path; ConfigurationError naming ``where`` (``save(path``)
    for what is not a path."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigurationError(f"{where}={path!r}): expected a directory path (a str or pathlib.Path).")
    return Path(path).absolute()


def checked_flag(value: Any, where: str) -> bool:
    """``value`` if it is a bool; ConfigurationError naming ``where`` (``save(save_updater``)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}={value!r}): expected True or False.")
    return value


def checked_iterator(iterator: Any, where: str) -> Any:
    """``iterator`` if it can record a position (or None); ConfigurationError otherwise,
    where nothing would be recorded without a word."""
    if iterator is not None and not callable(getattr(iterator, "state_dict", None)):
        raise ConfigurationError(
            f"{where}=<{type(iterator).__name__}>): it has no state_dict(), so no position would be "
            "recorded. Pass the training ArrayDataSetIterator (or an AsyncDataSetIterator around one), "
            "or None."
        )
    return iterator


def _name(path: tuple) -> str:
    parts = []
    for key in path:
        for attribute in ("name", "key", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``tree``'s leaves by dotted path (``params.0.W``)."""
    return {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _carry_tree(model: Any, carry: Any, with_updater: bool) -> dict:
    tree = {"params": carry.params, "state": carry.state, "rng": jax.random.key_data(model._rng)}
    if with_updater:
        tree["updater"] = carry.opt_state
    return tree


def _describe(leaves: dict[str, Any]) -> dict[str, list]:
    return {name: [list(np.shape(a)), str(np.dtype(a.dtype))] for name, a in leaves.items()}


def content(model: Any, *, save_updater: bool = True, iterator: Any = None) -> tuple[dict, dict]:
    """``(host arrays by name, meta)`` of ``model`` now: one consistent version.

    The arrays are copied to host memory under the model's lock, so a step that donates
    the carry afterwards cannot touch them; nothing is copied on the device.
    """
    with model._lock, allow_reads():  # asked for: not a hidden sync
        carry = model._require_init()
        leaves = named_leaves(_carry_tree(model, carry, save_updater))
        if jax.default_backend() != "cpu":  # start every transfer, then wait for each
            for x in leaves.values():
                x.copy_to_host_async()
        arrays = {name: np.array(x) for name, x in leaves.items()}  # numpy's own copies
        iteration, epoch = model.iteration, model.epoch
        position = model._data_position(iterator)
    conf = getattr(model, "conf", None)
    meta = {
        "format": FORMAT,
        "version": 1,
        "model": type(model).__name__,
        "conf": None if conf is None else conf.to_dict(),
        "iteration": iteration,
        "epoch": epoch,
        "updater_saved": save_updater,
        "rng_impl": str(jax.random.key_impl(model._rng)),
        "leaves": _describe(arrays),
        "iterator": position,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return arrays, meta


def items_args(arrays: dict | None, meta: dict | None, restore: bool = False):
    ocp = orbax_checkpoint()
    if restore:
        template = None if arrays is None else {k: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for k, (s, d) in arrays.items()}
        items = {"meta": ocp.args.JsonRestore()}
        if template is not None:
            items["arrays"] = ocp.args.StandardRestore(template)
        return ocp.args.Composite(**items)
    return ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))


def save_model(model: Any, path: str | Path, *, save_updater: bool = True, iterator: Any = None) -> Path:
    """Writes ``model`` to the directory ``path``; returns the path. A jaxws checkpoint or
    an empty directory there is replaced; anything else is refused (CheckpointError).

    The write is atomic (orbax writes a temporary directory and renames it when complete),
    and so is a replacement: the new checkpoint is written beside ``path`` and swapped in
    when whole, so a save that fails or is interrupted leaves what was there as it was.
    (orbax's own ``force=True`` deletes the old checkpoint before writing the new one.)
    """
    path = checked_path(path, "save(path")
    checked_flag(save_updater, "save(save_updater")
    checked_iterator(iterator, "save(iterator")
    _refuse_to_replace(path)
    arrays, meta = content(model, save_updater=save_updater, iterator=iterator)
    ocp = orbax_checkpoint()
    replacing = path.exists() or path.is_symlink()
    target = path.with_name(f".{path.name}.jaxws-new") if replacing else path
    primary = jax.process_index() == 0
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            # force: what may be at target is a leftover of ours (or, for a new path, a race)
            checkpointer.save(target, args=items_args(arrays, meta), force=True)
    except BaseException:
        if replacing and primary:  # the half-written new one; the old one is untouched
            for leftover in path.parent.glob(f"{glob.escape(target.name)}*"):
                _remove(leftover)
        raise
    if replacing:
        if primary:
            old = path.with_name(f".{path.name}.jaxws-old")
            _remove(old)  # a leftover of a swap cut short by a killed process
            with guarded() as guard, guard:  # both renames or neither
                os.replace(path, old)
                os.replace(target, path)
            _remove(old)
        if jax.process_count() > 1:  # no process returns (and loads) before the swap
            ocp.multihost.sync_global_processes("jaxws.save_model: swapped in")
    return path


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _refuse_to_replace(path: Path) -> None:
    """Raises CheckpointError where ``path`` holds something other than a jaxws checkpoint
    or an empty directory: orbax replaces whatever is there (``force=True`` deletes it), so
    ``save(".")`` would delete the working directory."""
    if not (path.exists() or path.is_symlink()) or (path.is_dir() and not any(path.iterdir())):
        return
    try:
        read_meta(path)
    except CheckpointError:
        what = (f"a directory of {sum(1 for _ in path.iterdir())} entries" if path.is_dir()
                else "a file" if path.is_file() else "something")
        raise CheckpointError(
            f"save: {path} holds {what}, not a jaxws checkpoint, and saving there would delete "
            "it; nothing was written. Save to a new path (or an empty directory), or remove it "
            "yourself first."
        ) from None


def read_meta(path: str | Path) -> dict:
    """The ``meta`` item of the checkpoint at ``path``.

    Raises:
        CheckpointError: nothing readable there.
    """
    path = checked_path(path, "read_meta(path")
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}: the directory does not exist.")
    ocp = orbax_checkpoint()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            meta = checkpointer.restore(path, args=items_args(None, None, restore=True)).meta
    except Exception as e:  # orbax and tensorstore raise many kinds
        raise CheckpointError(f"Cannot read the checkpoint at {path}: {type(e).__name__}: {e}") from e
    return checked_meta(meta, path)


def checked_meta(meta: Any, where: Any) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a jaxws checkpoint (its meta item holds no {FORMAT!r} format).")
    return meta


def restore_plan(model: Any, meta: dict, load_updater: bool, where: Any) -> tuple[dict, Any]:
    """What to restore: the saved leaves to read, after checking they fit ``model``."""
    carry = model._require_init()
    expected = _describe(named_leaves(_carry_tree(model, carry, True)))
    saved = meta["leaves"]
    for name, (shape, dtype) in saved.items():
        if name.startswith("updater.") and not load_updater:
            continue
        if name not in expected:
            raise CheckpointError(
                f"The checkpoint at {where} does not fit this {type(model).__name__}: it holds "
                f"{name} {dtype}{shape}, which the model does not have. Load it into the "
                "architecture it was saved from."
            )
        if expected[name] != [shape, dtype]:
            want = expected[name]
            raise CheckpointError(
                f"The checkpoint at {where} does not fit this {type(model).__name__}: {name} is "
                f"{dtype}{shape} there and {want[1]}{want[0]} here."
            )
    needed = [n for n in expected if not n.startswith("updater.") or (load_updater and meta["updater_saved"])]
    missing = [n for n in needed if n not in saved]
    if missing:
        raise CheckpointError(
            f"The checkpoint at {where} does not fit this {type(model).__name__}: it lacks "
            f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}."
        )
    return saved, expected


def install(model: Any, arrays: dict, meta: dict, load_updater: bool) -> None:
    """Puts restored arrays into ``model`` in one commit (or changes nothing)."""
    with model._lock:
        carry = model._require_init()
        tree = _carry_tree(model, carry, True)
        paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = []
        for path, old in paths:
            name = _name(path)
            if name.startswith("updater.") and not (load_updater and meta["updater_saved"]):
                leaves.append(old)
            else:
                leaves.append(jnp.asarray(arrays[name], dtype=old.dtype))
        restored = jax.tree.unflatten(treedef, leaves)
        opt_state = (restored["updater"] if load_updater and meta["updater_saved"]
                     else model._updater.init(restored["params"]))
        with guarded() as guard, guard:  # an interrupt never leaves new params at the old iteration
            model._carry = carry._replace(params=restored["params"], state=restored["state"], opt_state=opt_state)
            model._rng = jax.random.wrap_key_data(restored["rng"], impl=meta["rng_impl"])
            model.iteration, model.epoch = meta["iteration"], meta["epoch"]
            model._restored_position = meta.get("iterator")


def restore_model(model: Any, path: str | Path, *, load_updater: bool = True) -> Any:
    """Restores the checkpoint at ``path`` into ``model`` (same architecture); returns it.

    Raises:
        CheckpointError: no checkpoint there, an unreadable one, or one that does not fit
            ``model`` (the message names the leaf); ``model`` is then unchanged.
    """
    path = checked_path(path, "restore(path")
    checked_flag(load_updater, "restore(load_updater")
    meta = read_meta(path)
    saved, _ = restore_plan(model, meta, load_updater, path)
    ocp = orbax_checkpoint()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            arrays = checkpointer.restore(path, args=items_args(saved, None, restore=True)).arrays
    except Exception as e:
        raise CheckpointError(f"Cannot read the arrays of the checkpoint at {path}: {type(e).__name__}: {e}") from e
    install(model, arrays, meta, load_updater)
    return model


def model_from_meta(meta: dict, conf: Any, where: str) -> Any:
    from jaxws.nn.conf import NeuralNetConfiguration
    from jaxws.nn.graph import ComputationGraph, ComputationGraphConfiguration
    from jaxws.nn.network import MultiLayerNetwork

    kinds = {"MultiLayerNetwork": (MultiLayerNetwork, NeuralNetConfiguration),
             "ComputationGraph": (ComputationGraph, ComputationGraphConfiguration)}
    kind = meta.get("model")
    if kind not in kinds:
        raise CheckpointError(
            f"The {where} holds a {kind}, which cannot be rebuilt from its configuration; "
            "create the model and pass it: load_checkpoint(n, model=model) / model.restore(path)."
        )
    cls, conf_cls = kinds[kind]
    if conf is None:
        if meta.get("conf") is None:
            raise CheckpointError(f"The {where} holds no configuration; pass conf=.")
        conf = conf_cls.from_dict(meta["conf"])
    return cls(conf).init()


def load_model(cls: type, conf_cls: type, path: str, load_updater: bool, conf: Any) -> Any:
    """A ``cls`` model rebuilt from the checkpoint at ``path`` (its saved configuration, or
    ``conf``), with the checkpoint's state."""
    path = checked_path(path, f"{cls.__name__}.load(path")
    checked_flag(load_updater, f"{cls.__name__}.load(load_updater")
    meta = read_meta(path)
    if meta.get("model") != cls.__name__:
        raise CheckpointError(f"The checkpoint at {path} holds a {meta.get('model')}, not a {cls.__name__}.")
    if conf is None:
        conf = conf_cls.from_dict(meta["conf"])
    return cls(conf).init().restore(path, load_updater=load_updater)


class CheckpointMixin:
    """``save`` / ``restore`` for models (mixed into :class:`~jaxws.nn.Model`)."""

    def save(self, path: str, *, save_updater: bool = True, iterator: Any = None) -> Any:
        """Writes the model to the directory ``path`` (DL4J's ``ModelSerializer.writeModel``).

        The arrays (parameters, layer state, the updater state unless ``save_updater`` is
        False, and the RNG) go through orbax-checkpoint, the configuration and counters as
        JSON; never pickle. The write is atomic and holds one consistent version, even while
        another thread trains. With ``iterator`` (an ArrayDataSetIterator, or an async one
        around it) its position is recorded, to resume mid-epoch with ``load_state_dict``.
        A checkpoint already at ``path`` (or an empty directory) is replaced; anything else
        there is left alone and refused.

        Returns:
            The checkpoint's absolute path.

        Raises:
            CheckpointError: ``path`` holds a file or a directory that is not a jaxws
                checkpoint (saving would delete it).

        Example:
            >>> import tempfile
            >>> from jaxws.nn import MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
            >>> net = MultiLayerNetwork(NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,))).init()
            >>> path = net.save(tempfile.mkdtemp() + "/net")
            >>> MultiLayerNetwork.load(path).num_params() == net.num_params()
            True
        """
        return save_model(self, path, save_updater=save_updater, iterator=iterator)

    def restore(self, path: str, *, load_updater: bool = True) -> Any:
        """Loads the checkpoint at ``path`` into this model (the same architecture).

        With ``load_updater=False`` (or a checkpoint saved without it) the updater starts
        afresh. Counters, layer state and the RNG come back as saved.

        Raises:
            CheckpointError: no checkpoint there, an unreadable one, or one of another
                architecture (the message names the leaf); the model is then unchanged.
        """
        return restore_model(self, path, load_updater=load_updater)

    @property
    def restored_iterator_state(self) -> dict | None:
        """The data position the last restored checkpoint recorded (for ``load_state_dict``)."""
        return self._restored_position

    def _data_position(self, iterator: Any) -> dict | None:
        """``iterator``'s state as consumed by training (its own cursor may run ahead under
        prefetching), or None if it records none."""
        if iterator is None or not hasattr(iterator, "state_dict"):
            return None
        state = iterator.state_dict()
        if self._position is not None and self._position["source"] is iterator and state is not None:
            state = {**state, "epoch": self._position["epoch"], "position": self._position["position"]}
        return state
