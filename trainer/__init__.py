"""Package marker; sets TF_USE_LEGACY_KERAS before TensorFlow is imported.

TFRS 0.7.7 needs Keras 2 (tf-keras): without this variable set before the first
``import tensorflow`` it refuses to import.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
