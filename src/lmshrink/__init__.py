"""lmshrink: make NLP language models smaller and faster with quantization, pruning and distillation.

Every result goes through one evaluation harness (:mod:`lmshrink.evaluation`) so that perplexity, agreement,
size and speed are measured the same way for every technique.
"""

from lmshrink.errors import LmshrinkError

__version__ = "0.1.0"
__all__ = ["LmshrinkError", "__version__"]
