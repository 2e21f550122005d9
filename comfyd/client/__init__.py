"""The ``comfyd`` client commands: submit, status, cancel, list, outputs, models, backends, doctor.

``await run_cli(argv, stdout=..., stderr=...)`` runs one in-process and returns its exit status.
"""

from comfyd.client.commands import add_client_commands, main, run_cli

__all__ = ["add_client_commands", "main", "run_cli"]
