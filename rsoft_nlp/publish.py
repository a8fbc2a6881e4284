"""Publishing a finished run to the Hugging Face Hub."""

from __future__ import annotations

__all__ = ["HubAccessError", "check_write_access", "push_run"]


class HubAccessError(RuntimeError):
    """The Hub cannot be written to with the token given."""


def check_write_access(repo_id, token):
    raise NotImplementedError("pushing to the Hub is not supported yet")


def push_run(run_dir, repo_id, token=None, private=False):
    raise NotImplementedError("pushing to the Hub is not supported yet")
