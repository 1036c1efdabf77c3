"""task=multilabel: each image has a set of classes (docs/multilabel.md).

scores: F1, average precision and per-class thresholds (NumPy, scikit-learn); training: the
sigmoid loss and metrics Keras trains with; report: the end-of-training evaluation, its plots and
artifacts. The data side is insect_exp/data/multilabel.py, the exported model's
models/multilabel.py.
"""
