"""Data: image sources (folders, tar archives, the built-in synthetic set), the view dataset and
its collate function, and the dataset checker.  Views themselves live in
:mod:`pirl.data.views` / :mod:`pirl.data.jigsaw`."""

from pirl.data.check import check_source
from pirl.data.datasets import FolderSource, TarSource, ViewDataset, collate_views, open_source
from pirl.data.source import BadImageError, DatasetError, ImageSource, UnreadableDataError
from pirl.data.synthetic import SyntheticSource
from pirl.data.views import ColourCollate

__all__ = [
    "BadImageError",
    "ColourCollate",
    "DatasetError",
    "FolderSource",
    "ImageSource",
    "SyntheticSource",
    "TarSource",
    "UnreadableDataError",
    "ViewDataset",
    "check_source",
    "collate_views",
    "open_source",
]
