"""What the command line does around a run: the process group under torchrun, reading a gene space, atomic writes."""

from __future__ import annotations

import contextlib
import os
import secrets
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._errors import InputError
from ._utils import logger


@contextlib.contextmanager
def process_group(options: dict[str, Any], env: typing.Mapping[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """Initialise ``torch.distributed`` when launched by torchrun (``WORLD_SIZE > 1``); yields (rank, world size).

    With CUDA (and no other device asked for) each rank takes ``cuda:{LOCAL_RANK}`` and the backend is NCCL;
    otherwise gloo. ``options["device"]`` is set to the rank's GPU when it was None or a bare ``"cuda"``.
    A single process (no torchrun, or ``WORLD_SIZE=1``) runs as is. The group is destroyed on the way out.
    """
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # the caller owns the group
        yield dist.get_rank(), dist.get_world_size()
        return
    local = int(env.get("LOCAL_RANK", "0"))
    device = options.get("device")
    cuda = torch.cuda.is_available() and (device is None or str(device).split(":")[0] == "cuda")
    if cuda:
        if device is None or str(device) == "cuda":
            options["device"] = f"cuda:{local}"
        torch.cuda.set_device(torch.device(options["device"]))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        logger.info(f"process group: rank {dist.get_rank()} of {dist.get_world_size()}, backend {dist.get_backend()}")
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def read_gene_space(path: Path) -> Any:
    """The gene space stored in a coreset .h5ad (``uns[key]["gene_space"]``), or at the top of ``uns``."""
    import anndata

    from .pp import GeneSpace

    if not Path(path).is_file():
        raise InputError(f"--gene-space {path}: file not found.")
    try:
        adata = anndata.read_h5ad(path, backed="r")  # uns only: X stays on disk
    except Exception as e:  # whatever h5py/anndata raise, the message is what matters
        raise InputError(f"--gene-space {path}: cannot read it as .h5ad ({e}).") from e
    try:
        uns = adata.uns
        if "gene_space" in uns:
            return GeneSpace.from_dict(uns["gene_space"])
        keys = [k for k, v in uns.items() if isinstance(v, typing.Mapping) and "gene_space" in v]
        if not keys:
            raise InputError(f"--gene-space {path}: no gene space in uns; pass a coreset written by 'train'.")
        return GeneSpace.from_dict(uns["sccoreset" if "sccoreset" in keys else keys[0]]["gene_space"])
    finally:
        adata.file.close()


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``) or whose folder does not, before any work."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; give a file name.")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} exists; pass --overwrite to replace it.")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: folder {out.parent} does not exist.")


def write_h5ad_atomic(adata: Any, out: Path, *, overwrite: bool) -> None:
    """Write ``adata`` to a temporary file beside ``out``, then rename it over ``out`` in one step.

    A crash or interruption while writing leaves ``out`` as it was (absent, or the previous file).
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial.h5ad")
    try:
        adata.write_h5ad(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} appeared while this command ran; the result is kept in {tmp}.")
    os.replace(tmp, out)
