"""BERT text-classification recipe trainer (Sun et al. 2019) on Accelerate + DeepSpeed."""
__version__ = "0.1.0"
