"""Dataset -> shard converters. Each returns
:class:`~dinor1.data_pipelines.shard_writer.ConversionSource` objects that
:func:`~dinor1.data_pipelines.shard_writer.write_shards` writes."""

from dinor1.data_pipelines.converters.coco import load_coco, load_objects365
from dinor1.data_pipelines.converters.lvis import load_lvis
from dinor1.data_pipelines.converters.odinw import find_odinw_datasets
from dinor1.data_pipelines.converters.odvg import load_odvg

__all__ = ["find_odinw_datasets", "load_coco", "load_lvis", "load_objects365", "load_odvg"]
