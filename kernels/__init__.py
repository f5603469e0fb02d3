"""Fused attention kernels that return token importance alongside the output (Triton), and references."""
from .attention import attention_row, attention_with_importance, triton_usable
from .reference import attention_row_ref, attention_with_importance_ref, importance_ref

__all__ = ["attention_with_importance", "attention_row", "triton_usable", "attention_with_importance_ref",
           "attention_row_ref", "importance_ref"]
