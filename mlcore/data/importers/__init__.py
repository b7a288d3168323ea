"""Importers writing the canonical dataset format from public dataset layouts.

One function per source format, each with keyword arguments mapping 1:1 to CLI flags:
:func:`import_coco`, :func:`import_voc`, :func:`import_nuswide`, :func:`import_nuswide1k`
(the 925/81 zero-shot split), :func:`import_openimages` (streaming), :func:`import_csv`.
The flags every format has are one :class:`ImportOptions` (``options=``).

Shared conventions: images are not copied (``image_root`` is the absolute image directory and
``path`` is relative to it); every referenced image file must exist unless
``skip_missing=True``, which leaves such rows out and records their number in the metadata
(``source["skipped"]``); ``verify_decode=True`` also runs PIL ``Image.verify`` on every image;
``drop_empty=True`` leaves out images without a label (counted too); an existing dataset is
only replaced with ``overwrite=True``. ``source`` metadata records the importer kind, its input
files, options and counts. Bad input raises :class:`~mlcore.data.manifest.ManifestError`
naming the file and line or entry.
"""

from mlcore.data.importers._common import ImportOptions, ImportResult, parse_split_map
from mlcore.data.importers.coco import CocoEntry, import_coco
from mlcore.data.importers.csv_labels import import_csv
from mlcore.data.importers.nuswide import import_nuswide
from mlcore.data.importers.nuswide1k import import_nuswide1k
from mlcore.data.importers.openimages import OpenImagesEntry, import_openimages
from mlcore.data.importers.voc import VOC_CLASSES, import_voc

__all__ = [
    "VOC_CLASSES",
    "CocoEntry",
    "ImportOptions",
    "ImportResult",
    "OpenImagesEntry",
    "import_coco",
    "import_csv",
    "import_nuswide",
    "import_nuswide1k",
    "import_openimages",
    "import_voc",
    "parse_split_map",
]
