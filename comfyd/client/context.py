"""What a command handler is given: the resolved settings, the console, the API session, the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from comfyd.client.api import Api
from comfyd.client.options import Settings
from comfyd.client.output import Console


@dataclass(frozen=True)
class Context:
    settings: Settings
    console: Console
    api: Api
    env: Mapping[str, str]
    stdin: TextIO
