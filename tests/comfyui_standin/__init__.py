"""A stand-in ComfyUI server for tests (HTTP + WebSocket on 127.0.0.1).

It reproduces what the recorded traces of a real ComfyUI 0.3.64 show
(shared/comfyui/traces): routes, validation errors, queue semantics, node
cache, the WebSocket message order and routing, history lag and restarts.
"""

from .server import StandInComfyUI

__all__ = ["StandInComfyUI"]
