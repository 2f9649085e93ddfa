"""Segmentation metrics as map/reduce on exact integers.

Map: :func:`confusion_matrix` of one image (int64). Reduce: sum the matrices. Then pure
functions turn a matrix into scores (:func:`class_scores`, :func:`summary_scores`) or into the
minor-class view (:func:`vanished_classes`).
"""
from .confusion import confusion_matrix
from .scores import ClassScores, class_scores, image_miou, summary_scores, vanished_classes

__all__ = [
    "ClassScores",
    "class_scores",
    "confusion_matrix",
    "image_miou",
    "summary_scores",
    "vanished_classes",
]
