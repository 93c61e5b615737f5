"""Quantization-aware training (``edgeq qat``); see ``edgeq.qat.core``."""

from edgeq.qat.core import QAT_FORMATS, QatResult, qat, table_lines

__all__ = ["QAT_FORMATS", "QatResult", "qat", "table_lines"]
