"""Putting datasets, rights holders and trained ensembles into the database (CLI side).

Training items are stored once per dataset (their PNGs once per content); an ensemble is
registered against the dataset it was trained on (same fingerprint), with one source code
per training item, checked before insertion.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.orm import Dataset, EnsembleRow, Image, Owner, SourceCode, TrainingItem
from app.pictures import to_png
from models.codes import validate_codes

if TYPE_CHECKING:
    from models.data import ImageDataset
    from models.ensemble import Ensemble


class RegistryError(ValueError):
    """A user error (shown as one line by the CLI)."""


def get_or_create_owner(s: Session, name: str) -> tuple[Owner, bool]:
    name = name.strip()
    if not name or len(name) > 200:
        raise RegistryError(f"owner name must be 1..200 characters, got {name!r}")
    row = s.scalar(select(Owner).where(Owner.name == name))
    if row is not None:
        return row, False
    row = Owner(name=name)
    s.add(row)
    s.flush()
    return row, True


def import_dataset(s: Session, ds: ImageDataset, name: str, spec: dict[str, object],
                   owners: Sequence[str | None] | None = None) -> Dataset:
    """Insert ``ds`` as dataset ``name`` with one training item per image (owner names per item
    or None). Refuses a name already taken by different data; the same data again is a no-op."""
    fp = ds.fingerprint()
    old = s.scalar(select(Dataset).where(Dataset.name == name))
    if old is not None:
        if old.fingerprint != fp:
            raise RegistryError(f"dataset {name!r} already exists with other content")
        return old
    if owners is not None and len(owners) != ds.N:
        raise RegistryError(f"{len(owners)} owners for {ds.N} items")
    row = Dataset(name=name, channels=ds.C, height=ds.H, width=ds.W, item_count=ds.N, spec=dict(spec),
                  fingerprint=fp)
    s.add(row)
    s.flush()
    owner_ids: dict[str, int] = {}
    known = set(s.scalars(select(Image.sha256)))
    x = ds.images.astype(np.float32) / 127.5 - 1.0
    for i in range(ds.N):
        png = to_png(x[i])
        sha = hashlib.sha256(png).hexdigest()
        if sha not in known:
            s.add(Image(sha256=sha, png=png, width=ds.W, height=ds.H))
            known.add(sha)
        owner_id = None
        if owners is not None and owners[i] is not None:
            oname = str(owners[i])
            if oname not in owner_ids:
                owner_ids[oname] = get_or_create_owner(s, oname)[0].id
            owner_id = owner_ids[oname]
        label = int(ds.labels[i]) if ds.labels is not None else None
        s.add(TrainingItem(dataset_id=row.id, index=i, owner_id=owner_id, external_ref=ds.refs[i],
                           label=label, sha256=ds.item_sha256(i), image_sha=sha))
    s.flush()
    return row


def register_ensemble(s: Session, ens: Ensemble, checkpoint: Path, name: str) -> EnsembleRow:
    """Register a trained ensemble against its imported dataset; codes checked and stored."""
    book = ens.codebook
    if book.granularity != "item":
        raise RegistryError(f"the service attributes to training items; {checkpoint} was trained with "
                            f"granularity {book.granularity!r} (train with --granularity item)")
    ds = s.scalar(select(Dataset).where(Dataset.fingerprint == ens.dataset.fingerprint))
    if ds is None:
        raise RegistryError(f"{checkpoint} was trained on data not imported yet ({ens.dataset.name}, "
                            f"{ens.dataset.num_items} items): run 'attrib import' with the same data first")
    if s.scalar(select(EnsembleRow).where(EnsembleRow.name == name)) is not None:
        raise RegistryError(f"an ensemble named {name!r} is already registered")
    try:
        validate_codes(book.codes, book.n, book.k)
    except ValueError as exc:
        raise RegistryError(f"{checkpoint}: invalid codes: {exc}") from exc
    if book.n > 62:
        raise RegistryError(f"n = {book.n}: the service stores codes as 63-bit integers (n <= 62)")
    items = dict(s.execute(select(TrainingItem.index, TrainingItem.id)
                           .where(TrainingItem.dataset_id == ds.id)).all())
    if len(items) != ds.item_count or len(book.item_source) != ds.item_count:
        raise RegistryError(f"dataset {ds.name!r} has {len(items)} items, "
                            f"the checkpoint {len(book.item_source)}")
    C, H, W = ens.shape
    row = EnsembleRow(name=name, dataset_id=ds.id, n=book.n, k=book.k, T=ens.schedule.T,
                      config={"preset": ens.preset, "unet": ens.net.config.to_dict(), "shape": [C, H, W]},
                      granularity=book.granularity, checkpoint=str(checkpoint.resolve()), status="ready",
                      served_members=(1 << book.n) - 1, withdrawn=[])
    s.add(row)
    s.flush()
    row.lineage_id = row.id  # the first version of its own lineage
    item_of_source = np.empty(book.num_sources, dtype=np.int64)
    item_of_source[book.item_source] = np.arange(len(book.item_source))
    s.add_all([SourceCode(ensemble_id=row.id, source_index=i, source_key=book.source_keys[i],
                          training_item_id=items[int(item_of_source[i])], code=int(book.codes[i]))
               for i in range(book.num_sources)])
    row.withdrawn = [items[int(item_of_source[i])] for i in book.withdrawn]
    s.flush()
    n_codes = s.scalar(select(func.count()).select_from(SourceCode).where(SourceCode.ensemble_id == row.id))
    assert n_codes == book.num_sources
    return row


def stored_dataset(s: Session, dataset_id: int) -> ImageDataset:
    """The training works of an imported dataset, read back from their stored PNGs (lossless: the
    same uint8 pixels, so the same fingerprint as the data imported)."""
    from models.data import ImageDataset  # torch: loaded by the worker or CLI that reads works back

    ds = s.get(Dataset, dataset_id)
    if ds is None:
        raise RegistryError(f"dataset {dataset_id} does not exist")
    rows = s.execute(select(TrainingItem.index, TrainingItem.label, TrainingItem.external_ref, Image.png)
                     .join(Image, Image.sha256 == TrainingItem.image_sha)
                     .where(TrainingItem.dataset_id == dataset_id).order_by(TrainingItem.index)).all()
    images = np.empty((len(rows), ds.channels, ds.height, ds.width), dtype=np.uint8)
    for i, row in enumerate(rows):
        with PILImage.open(io.BytesIO(row.png)) as im:
            pixels = np.asarray(im.convert("L" if ds.channels == 1 else "RGB"))
        images[i] = pixels[None] if ds.channels == 1 else np.moveaxis(pixels, -1, 0)
    labels = None if any(r.label is None for r in rows) else np.array([r.label for r in rows], dtype=np.int64)
    out = ImageDataset(ds.name, images, labels, None, tuple(r.external_ref for r in rows))
    if out.fingerprint() != ds.fingerprint:
        raise RegistryError(f"the stored works of dataset {ds.name!r} do not match its fingerprint")
    return out
