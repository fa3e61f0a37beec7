"""ollama-lb's core: the ring pipeline, routing and resilience, usable without HTTP.

This package never imports Flask, Werkzeug or ``app``: the HTTP shell depends on it, not the
other way round.
"""

from pipeline.config import Config, ConfigError, load_config, parse_text
from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.factory import PipelineFactory
from pipeline.node import Health, Node
from pipeline.request import InferenceRequest, InferenceResponse, StreamHandle, Ticket
from pipeline.strategy import Strategy, StrategyFactory

__all__ = [
    "BackpressureError",
    "Config",
    "ConfigError",
    "ErrorCode",
    "Health",
    "InferenceRequest",
    "InferenceResponse",
    "Node",
    "PipelineError",
    "PipelineFactory",
    "Strategy",
    "StrategyFactory",
    "StreamHandle",
    "Ticket",
    "load_config",
    "parse_text",
]
