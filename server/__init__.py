"""fedsqueeze on the server: the compressing strategy wrapper, distillation into a compact model, export."""

from fedsqueeze.server.compact import (
    CompactConfig,
    LowRankConv2d,
    LowRankLinear,
    Tucker2Conv2d,
    build_student,
    count_parameters,
)
from fedsqueeze.server.distill import DistillConfig, DistillResult, distill, proxy_split, teacher_logits
from fedsqueeze.server.export import ExportInfo, export_and_measure, export_compact, load_safetensors
from fedsqueeze.server.onnx_export import OnnxExportInfo, export_onnx
from fedsqueeze.server.server_distiller import ServerDistiller
from fedsqueeze.server.strategy import CompressedStrategy, Rejection, TrafficRecord

__all__ = [
    "CompactConfig",
    "CompressedStrategy",
    "DistillConfig",
    "DistillResult",
    "ExportInfo",
    "LowRankConv2d",
    "LowRankLinear",
    "OnnxExportInfo",
    "Rejection",
    "ServerDistiller",
    "TrafficRecord",
    "Tucker2Conv2d",
    "build_student",
    "count_parameters",
    "distill",
    "export_and_measure",
    "export_compact",
    "export_onnx",
    "load_safetensors",
    "proxy_split",
    "teacher_logits",
]
